"""The standard benchmark set (``make bench``): same model, same inputs, servers side by side.

Targets, each started as a subprocess on a free loopback port and stopped at the end:

* ``exitserve`` early exit with refill (the default), swept over speeds; speed 0 is full depth;
* ``exitserve --batching shrink``: early exit, a batch runs until its last row exits, no refill;
* ``pipeline``: plain FastAPI, batch size 1, full depth (``loadtest.baselines.pipeline_server``);
* ``exitserve`` on a random 1-layer tiny model: the front end's own ceiling.

Closed-loop runs measure capacity (and accuracy over the whole split: one request per example); open
loop runs measure latency at 70 % of each target's measured capacity, and at one offered load shared by
all targets (the latency CDF). Every run writes ``<out>/runs/<name>.json``; ``<out>/bench.json`` indexes
them; plots go to ``docs/bench-*.png`` and the tables into BENCHMARKS.md.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.dataset import Example, load_jsonl, load_split, sample
from loadtest.generator import LoadSettings, RunResult, run_load_sync
from loadtest.machine import REPO_ROOT, git_commit, machine_info, now_iso
from loadtest.progress import stderr_progress
from loadtest.report import describe_target, run_document, write_json
from loadtest.results import ACCURACY_TOLERANCE
from loadtest.servers import RunningServer, exitserve_spec, pipeline_spec, process_cpu_s, running
from loadtest.tiny import TINY_MODEL_NAME, make_tiny_store
from model_store.store import ModelStore

CAPACITY_FRACTION = 0.7  # open-loop latency at 70 % of the measured closed-loop throughput


@dataclass(frozen=True)
class BenchOptions:
    store: Path = Path("store")
    model: str = "spam-minilm"
    out_dir: Path = Path("bench-out")
    dataset: str | None = None  # JSONL; None = the SpamAssassin split from model_store.data
    split: str = "test"
    limit: int | None = None
    seed: int = 0
    quick: bool = False  # short runs: checks the whole pipeline in ~2 minutes, numbers not for the report
    write_markdown: bool = True
    speeds: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8)
    shrink_speeds: tuple[float, ...] = (0.0, 0.1, 0.2, 0.5)
    concurrency: int = 64
    tiny_concurrency: int = 128
    closed_max_duration_s: float = 75.0
    open_duration_s: float = 20.0
    tiny_duration_s: float = 15.0
    num_warmup_requests: int = 16


@dataclass
class Bench:
    """Runs so far, by name, and what the report needs to know about them."""

    options: BenchOptions
    examples: list[Example]
    dataset: dict[str, Any]
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def run(
        self,
        name: str,
        server: RunningServer,
        group: str,
        *,
        mode: str = "closed",
        speeds: Sequence[float | None] = (None,),
        criterion: str | None = None,
        rate_per_s: float | None = None,
        concurrency: int | None = None,
        max_requests: int | None = None,
        max_duration_s: float | None = None,
        examples: list[Example] | None = None,
        keep_latencies: bool = False,
    ) -> dict[str, Any]:
        o = self.options
        examples = examples or self.examples
        if max_duration_s is None:
            max_duration_s = o.closed_max_duration_s if mode == "closed" else o.open_duration_s
        if o.quick:
            max_duration_s = min(max_duration_s, 5.0)
        if max_requests is None:
            max_requests = len(examples) if mode == "closed" else int((rate_per_s or 1) * max_duration_s) + 1
        settings = LoadSettings(
            url=server.url,
            mode="open" if mode == "open" else "closed",
            concurrency=concurrency or o.concurrency,
            rate_per_s=rate_per_s,
            max_requests=max_requests,
            max_duration_s=max_duration_s,
            speeds=tuple(speeds),
            criterion=criterion,
            seed=o.seed,
            num_warmup_requests=o.num_warmup_requests,
        )
        started_at = now_iso()
        progress = stderr_progress(name, settings.max_requests, settings.max_duration_s, quiet=False)
        server_cpu_before_s = process_cpu_s(server.pid)
        result: RunResult = run_load_sync(settings, examples, progress)
        server_cpu_after_s = process_cpu_s(server.pid)
        document = run_document(name, result, self.dataset, describe_target(server.url), started_at)
        document["group"] = group
        if server_cpu_before_s is not None and server_cpu_after_s is not None:
            # The server's own CPU per request (warm-up requests included: they are few).
            num_sent = result.summary["num_requests"] + settings.num_warmup_requests
            server_cpu_s = server_cpu_after_s - server_cpu_before_s
            document["results"]["server_cpu_s"] = server_cpu_s
            document["results"]["server_cpu_ms_per_request"] = server_cpu_s * 1000.0 / max(num_sent, 1)
        if keep_latencies:
            document["latencies_ms"] = sorted(r.latency_s * 1000.0 for r in result.records if r.ok)
        write_json(o.out_dir / "runs" / f"{name}.json", document)
        self.runs[name] = document
        s = result.summary
        print(
            f"  {name}: {s['throughput_rps']:.1f} req/s, p50 {_fmt(s['latency_ms']['p50'])} ms, "
            f"p99 {_fmt(s['latency_ms']['p99'])} ms, accuracy {_fmt(s['accuracy'], 4)}, "
            f"mean exit layer {_fmt(s['mean_exit_layer'], 2)}, errors {s['errors_by_status']}",
            flush=True,
        )
        return document


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def throughput(document: dict[str, Any]) -> float:
    return float(document["results"]["throughput_rps"])


def choose_speed(runs: dict[str, dict[str, Any]], speeds: Sequence[float], prefix: str) -> float:
    """The fastest speed whose accuracy is within 0.5 pt of full depth (speed 0)."""
    full = runs[f"{prefix}-speed-0"]["results"]["accuracy"]
    best_speed, best_rps = 0.0, throughput(runs[f"{prefix}-speed-0"])
    for speed in speeds:
        doc = runs[f"{prefix}-speed-{speed:g}"]
        acc = doc["results"]["accuracy"]
        if (
            acc is not None
            and full is not None
            and acc >= full - ACCURACY_TOLERANCE
            and throughput(doc) > best_rps
        ):
            best_speed, best_rps = speed, throughput(doc)
    return best_speed


def _load_examples(options: BenchOptions) -> tuple[list[Example], dict[str, Any]]:
    if options.dataset:
        examples, source = load_jsonl(options.dataset), options.dataset
    else:
        examples, source = load_split(options.split), f"SpamAssassin {options.split} split (model_store.data)"
    limit = options.limit if not options.quick else min(options.limit or 10**9, 200)
    chosen = sample(examples, limit, options.seed)
    return chosen, {"source": source, "num_examples": len(chosen), "seed": options.seed}


def run_bench(options: BenchOptions) -> int:
    """Run the standard set, then write bench.json, the plots and BENCHMARKS.md."""
    started = time.perf_counter()
    out_dir = options.out_dir
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    for old in (out_dir / "runs").glob("*.json"):
        old.unlink()  # a report shows one bench run, never a mix of two
    machine_before = machine_info()
    print(
        f"bench: machine {machine_before['cpu']} x{machine_before['num_cpus']}, "
        f"load {machine_before['load_average_1_5_15']}",
        flush=True,
    )
    load_1min = machine_before["load_average_1_5_15"][0]
    if load_1min > 0.5 * (machine_before["num_cpus"] or 1):
        print(
            f"bench: WARNING: the machine is busy (1-min load {load_1min:.1f}); the server and the load "
            "generator share its cores with whatever runs, so numbers will be lower",
            flush=True,
        )
    examples, dataset = _load_examples(options)
    bench = Bench(options=options, examples=examples, dataset=dataset)
    print(f"bench: {dataset['num_examples']} examples from {dataset['source']}", flush=True)
    logs = out_dir / "logs"
    o = options
    # Every target serves the same version, even if a newer one appears in the store meanwhile.
    version = ModelStore(o.store).latest_version(o.model)
    print(f"bench: model {o.model} version {version} from {o.store}", flush=True)
    speeds = o.speeds if not o.quick else (0.0, 0.2, 0.5)
    shrink_speeds = o.shrink_speeds if not o.quick else (0.0, 0.2, 0.5)

    # 1. the plain batch-size-1 pipeline server: full depth, one request at a time. 70 % of its
    # capacity is also the one offered load every target gets for the latency CDF (all sustain it).
    with running(pipeline_spec("pipeline", o.store, o.model, version), logs) as server:
        pipeline = bench.run("pipeline", server, "pipeline", speeds=(0.0,))
        common_rate = CAPACITY_FRACTION * throughput(pipeline)
        bench.run(
            "pipeline-open70",
            server,
            "common",
            mode="open",
            speeds=(0.0,),
            rate_per_s=common_rate,
            keep_latencies=True,
        )

    # 2. exitserve, early exit with refill: capacity per speed, a mixed-speed run, latency at 70 %.
    with running(exitserve_spec("exitserve-refill", o.store, o.model, version, "refill"), logs) as server:
        for speed in speeds:
            bench.run(f"refill-speed-{speed:g}", server, "refill", speeds=(speed,))
        chosen = choose_speed(bench.runs, speeds, "refill")
        bench.run("refill-mixed", server, "mixed", speeds=tuple(sorted({0.0, chosen, 0.8})))
        for speed in sorted({0.0, chosen}):
            capacity = throughput(bench.runs[f"refill-speed-{speed:g}"])
            bench.run(
                f"refill-speed-{speed:g}-open70",
                server,
                "open70",
                mode="open",
                speeds=(speed,),
                rate_per_s=CAPACITY_FRACTION * capacity,
                keep_latencies=True,
            )
            bench.run(
                f"refill-speed-{speed:g}-common",
                server,
                "common",
                mode="open",
                speeds=(speed,),
                rate_per_s=common_rate,
                keep_latencies=True,
            )

    # 3. early exit without refill (plain shrinking batches).
    with running(exitserve_spec("exitserve-shrink", o.store, o.model, version, "shrink"), logs) as server:
        for speed in sorted({*shrink_speeds, chosen}):
            bench.run(f"shrink-speed-{speed:g}", server, "shrink", speeds=(speed,))
        capacity = throughput(bench.runs[f"shrink-speed-{chosen:g}"])
        bench.run(
            f"shrink-speed-{chosen:g}-open70",
            server,
            "open70",
            mode="open",
            speeds=(chosen,),
            rate_per_s=CAPACITY_FRACTION * capacity,
            keep_latencies=True,
        )
        bench.run(
            f"shrink-speed-{chosen:g}-common",
            server,
            "common",
            mode="open",
            speeds=(chosen,),
            rate_per_s=common_rate,
            keep_latencies=True,
        )

    # 4. the front end's own ceiling: a random 1-layer model, many small requests.
    tiny_store = out_dir / "store-tiny"
    tiny_version = make_tiny_store(tiny_store).name
    tiny_spec = exitserve_spec("exitserve-tiny", tiny_store, TINY_MODEL_NAME, tiny_version, "refill")
    with running(tiny_spec, logs) as server:
        tiny = bench.run(
            "tiny-1layer",
            server,
            "tiny",
            concurrency=o.tiny_concurrency,
            max_requests=10**6,
            max_duration_s=o.tiny_duration_s,
        )
        bench.run(
            "tiny-1layer-open70",
            server,
            "open70",
            mode="open",
            rate_per_s=CAPACITY_FRACTION * throughput(tiny),
            max_duration_s=o.tiny_duration_s / 1.5,
            concurrency=o.tiny_concurrency,
            keep_latencies=True,
        )

    index = {
        "finished_at": now_iso(),
        "elapsed_s": time.perf_counter() - started,
        "machine_before": machine_before,
        "machine_after": machine_info(),
        "commit": git_commit(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "dataset": dataset,
        "model_version": version,
        "chosen_speed": chosen,
        "common_rate_per_s": common_rate,
        "runs": sorted(bench.runs),
    }
    write_json(out_dir / "bench.json", index)
    print(f"bench: done in {index['elapsed_s']:.0f} s -> {out_dir}", flush=True)
    write_outputs(out_dir, write_markdown=options.write_markdown)
    return 0


def load_bench(out_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    index = json.loads((out_dir / "bench.json").read_text())
    runs = {name: json.loads((out_dir / "runs" / f"{name}.json").read_text()) for name in index["runs"]}
    return index, runs


def write_outputs(out_dir: Path, write_markdown: bool = True) -> None:
    """Plots into docs/ and the generated part of BENCHMARKS.md, from ``out_dir``'s JSON files."""
    from loadtest.markdown import update_benchmarks_md
    from loadtest.plots import draw_all

    index, runs = load_bench(out_dir)
    plot_dir = REPO_ROOT / "docs" if write_markdown else out_dir / "plots"
    paths = draw_all(index, runs, plot_dir)
    print("plots: " + ", ".join(str(p) for p in paths))
    if write_markdown:
        path = update_benchmarks_md(index, runs, REPO_ROOT / "BENCHMARKS.md")
        print(f"report: {path}")


def main() -> int:  # pragma: no cover - convenience for `python -m loadtest.bench`
    return run_bench(BenchOptions())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
