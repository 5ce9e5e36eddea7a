"""The default model at its default speed on real emails: the engine core fed directly vs over HTTP.

The core alone: an ``EngineCore`` in this process with the server's default settings, fed the emails'
token rows as ``AddRequest`` messages, ``connections`` requests in flight (one email each), until every
email was answered once. Over HTTP: ``python -m server`` with its defaults (but for the queue-wait bound,
off: this measures throughput, not admission) under wrk with the same emails and as many connections.
"""

from __future__ import annotations

import json
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


def core_alone_rps(options: Any, emails: list[str]) -> dict[str, Any]:
    import torch

    from model_store.policy import CRITERION_CODES, threshold_for
    from model_store.store import ModelStore
    from model_store.tokens import RowTokenizer
    from server.__main__ import torch_threads
    from server.engine.core import EngineCore
    from server.engine.messages import AddRequest, Hello, pack_token_ids
    from server.settings import Settings

    settings = Settings(store=options.store, model=options.model)
    torch.set_num_threads(torch_threads(settings))
    torch.set_grad_enabled(False)
    loaded = ModelStore(options.store).load(options.model)
    m = loaded.manifest
    rows = RowTokenizer(loaded.tokenizer, m.max_seq_length)(emails)
    code = CRITERION_CODES[m.default_criterion]
    threshold = threshold_for(m.default_criterion, m.default_speed, len(m.labels), m.num_layers)
    core = EngineCore(loaded, settings.engine_config())
    sink = _Collect()
    core.handle(b"bench", Hello(1))

    def add(i: int) -> None:
        ids, _ = rows[i % len(rows)]
        core.handle(
            b"bench",
            AddRequest(
                epoch=core.epoch, request_id=i, token_ids=[pack_token_ids(ids)],
                criterion_code=code, threshold=threshold, max_layers=m.num_layers, speed=m.default_speed,
                speed_is_default=True, deadline_s=None,
            ),
        )  # fmt: skip

    sent = 0
    for _ in range(min(options.connections, len(rows))):
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
    return {"rps": sink.num_answered / elapsed_s, "failed": sink.num_failed, "speed": m.default_speed}


def core_vs_http(options: Any, emails: list[str]) -> dict[str, Any]:
    from loadtest.ceiling import run_wrk

    sample = emails[:600]
    core = core_alone_rps(options, sample)
    argv = [sys.executable, "-m", "server", "--store", str(options.store), "--model", options.model]
    argv += ["--host", "{host}", "--port", "{port}", "--max-queue-wait-ms", "none", "--log-level", "warning"]
    with running(ServerSpec("default-model", argv), options.out_dir / "logs") as server:
        bodies = [json.dumps({"inputs": [t]}).encode() for t in sample]
        http = run_wrk(server.url, bodies, options, server.pid)
        frontends = Settings().num_frontends()  # the server ran with the default for this machine
    return {
        "model": options.model,
        "speed": core["speed"],
        "num_emails": len(sample),
        "connections": options.connections,
        "core_rps": core["rps"],
        "http_rps": http["ok_rps"],
        "http_non_2xx": http["non_2xx"],
        "http_p99_ms": http["p99_ms"],
        "http_cpu_ms_per_request": http["server_cpu_ms_per_request"],
        "frontends": frontends,
        "ratio": http["ok_rps"] / core["rps"],
    }
