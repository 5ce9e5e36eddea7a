"""The default model at its default speed on real emails: the engine core fed directly vs over HTTP.

The core alone: an ``EngineCore`` in this process with the server's default settings (but for the
queue-wait bound, off as below), reporting to the server's Prometheus metrics, fed the emails' token
rows as ``AddRequest`` messages, ``connections`` requests in flight (one email each), until every
email was answered once. Over HTTP: ``python -m server`` with its defaults (but for the queue-wait
bound, off: this measures throughput, not admission) under wrk with the same emails and as many
connections. The two take turns for ``rounds`` rounds; the figure is the median of the rounds' ratios.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

from loadtest.servers import ServerSpec, running
from server.settings import Settings


class _Collect:
    """Stands in for the core's socket: counts the answers it would send."""

    def __init__(self) -> None:
        self.num_answered = 0
        self.num_failed = 0

    def send(self, identity: bytes, message: Any) -> None:
        from server.engine.messages import Outputs

        if isinstance(message, Outputs):
            self.num_answered += len(message.finished)
            self.num_failed += len(message.failed)


class CoreAlone:
    """The core-alone side, prepared once (model loaded and the GC frozen as the server does, emails
    tokenized); each ``run`` feeds a fresh ``EngineCore`` with the server's default settings but for the
    queue-wait bound, off as on the HTTP side, and the server's metrics."""

    def __init__(self, options: Any, emails: list[str]) -> None:
        import torch

        from loadtest.hostcost import freeze_like_the_server
        from model_store.policy import CRITERION_CODES, threshold_for
        from model_store.store import ModelStore
        from model_store.tokens import RowTokenizer
        from server.__main__ import torch_threads

        # As the HTTP side runs (``--max-queue-wait-ms none``): no request is refused on either side.
        self.settings = Settings(store=options.store, model=options.model, max_queue_wait_ms=None)
        torch.set_num_threads(torch_threads(self.settings))
        self.loaded = ModelStore(options.store).load(options.model)
        freeze_like_the_server()
        m = self.loaded.manifest
        self.rows = RowTokenizer(self.loaded.tokenizer, m.max_seq_length)(emails)
        self.code = CRITERION_CODES[m.default_criterion]
        self.threshold = threshold_for(m.default_criterion, m.default_speed, len(m.labels), m.num_layers)
        self.connections = options.connections

    def run(self) -> dict[str, Any]:
        """Every email answered once, ``connections`` in flight (closed loop): rows/s, refusals, and the
        rows the core's metrics counted. The caller's grad mode is left as it was (the core's start-up
        calibration turns it off for its process, as a served core's does)."""
        import torch

        grad_enabled = torch.is_grad_enabled()
        try:
            return self._run()
        finally:
            torch.set_grad_enabled(grad_enabled)

    def _run(self) -> dict[str, Any]:
        import torch

        from server.engine.core import EngineCore
        from server.engine.messages import AddRequest, Hello, pack_token_ids
        from server.metrics import ServerMetrics

        m, rows = self.loaded.manifest, self.rows
        # Reporting to the server's own metrics, as the served core does (one process: ``--frontends 1``).
        metrics = ServerMetrics(self.settings.model)
        metrics.bind_model(m.num_layers)
        core = EngineCore(self.loaded, self.settings.engine_config(), metrics)
        sink = _Collect()
        core.handle(b"bench", Hello(1))

        def add(i: int) -> None:
            ids, _ = rows[i % len(rows)]
            core.handle(
                b"bench",
                AddRequest(
                    epoch=core.epoch, request_id=i, token_ids=[pack_token_ids(ids)],
                    criterion_code=self.code, threshold=self.threshold, max_layers=m.num_layers,
                    speed=m.default_speed, speed_is_default=True, deadline_s=None,
                ),
            )  # fmt: skip

        with torch.inference_mode():  # as the core's own loop runs (``EngineCore.run``)
            sent = 0
            for _ in range(min(self.connections, len(rows))):
                add(sent)
                sent += 1
            started = time.perf_counter()
            while sink.num_answered + sink.num_failed < len(rows):
                before = sink.num_answered + sink.num_failed
                core.step()
                core.flush(sink)  # type: ignore[arg-type]
                for _ in range(sink.num_answered + sink.num_failed - before):  # closed loop: refill what left
                    if sent < len(rows):
                        add(sent)
                        sent += 1
            elapsed_s = time.perf_counter() - started
        model = {"model": self.settings.model}
        rows_counted = metrics.registry.get_sample_value("exitserve_rows_total", model)
        return {"rps": sink.num_answered / elapsed_s, "failed": sink.num_failed, "rows_counted": rows_counted}


def core_vs_http(options: Any, emails: list[str]) -> dict[str, Any]:
    """``options.rounds`` rounds, the core alone and HTTP taking turns (one server started once): on a
    shared machine a neighbour's load moves either figure by a third from one minute to the next, so
    the ratio is taken within each round and the median of the rounds' ratios is the figure."""
    from loadtest.ceiling import run_wrk

    sample = emails[:600]
    core = CoreAlone(options, sample)
    argv = [sys.executable, "-m", "server", "--store", str(options.store), "--model", options.model]
    argv += ["--host", "{host}", "--port", "{port}", "--max-queue-wait-ms", "none", "--log-level", "warning"]
    rounds: list[dict[str, Any]] = []
    with running(ServerSpec("default-model", argv), options.out_dir / "logs") as server:
        bodies = [json.dumps({"inputs": [t]}).encode() for t in sample]
        for _ in range(max(1, options.rounds)):
            alone = core.run()
            http = run_wrk(server.url, bodies, options, server.pid)
            rounds.append(
                {
                    "core_rps": alone["rps"],
                    "core_failed": alone["failed"],
                    "http_rps": http["ok_rps"],
                    "http_non_2xx": http["non_2xx"],
                    "http_p99_ms": http["p99_ms"],
                    "http_cpu_ms_per_request": http["server_cpu_ms_per_request"],
                    "ratio": http["ok_rps"] / alone["rps"],
                }
            )
        frontends = Settings().num_frontends()  # the server ran with the default for this machine
    return summarize(rounds) | {
        "model": options.model,
        "speed": core.loaded.manifest.default_speed,
        "num_emails": len(sample),
        "connections": options.connections,
        "frontends": frontends,
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the rounds (the ratio's within each round first), non-2xx summed,
    the ratios' range, and every round."""
    ratios = [r["ratio"] for r in rounds]
    return {
        "core_rps": statistics.median(r["core_rps"] for r in rounds),
        "http_rps": statistics.median(r["http_rps"] for r in rounds),
        "core_failed": sum(r["core_failed"] for r in rounds),
        "http_non_2xx": sum(r["http_non_2xx"] for r in rounds),
        "http_p99_ms": statistics.median(r["http_p99_ms"] for r in rounds),
        "http_cpu_ms_per_request": statistics.median(r["http_cpu_ms_per_request"] for r in rounds),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "rounds": rounds,
    }
