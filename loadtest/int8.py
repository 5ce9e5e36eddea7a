"""``python -m loadtest int8``: int8 + early exit against float32 + early exit, through HTTP, one run.

Both versions of the default model serve real emails (the SpamAssassin test split) in closed loop. The
float32 version is the store's latest non-quantized one; its int8 version is made by
``python -m model_store quantize`` into ``<out>/store-int8`` (kept between runs) and so carries its own
calibration. Each version runs at the fastest setting whose **test-split** accuracy (from its manifest's
test evaluation) is at most ``allowed_drop_pts`` below float32 full depth, and at full depth. Runs
alternate float32 / int8 for ``num_rounds`` rounds on the same machine (the machine is shared and
noisy: the ratio is taken within each round, then the median is reported). The tables go into
BENCHMARKS.md between the ``int8`` markers.
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.bench import Bench, BenchOptions, throughput
from loadtest.dataset import load_split, sample
from loadtest.machine import git_commit, machine_info, now_iso
from loadtest.report import write_json
from loadtest.servers import exitserve_spec, running
from model_store.layout import read_manifest
from model_store.manifest import Manifest
from model_store.store import ModelStore

BEGIN, END = "<!-- int8:begin -->", "<!-- int8:end -->"


@dataclass(frozen=True)
class Int8Options:
    store: Path = Path("store")
    model: str = "spam-minilm"
    version: str | None = None  # the float32 source; None = the latest non-quantized version
    out_dir: Path = Path("bench-out")
    allowed_drop_pts: float = 0.5
    num_rounds: int = 2
    duration_s: float = 30.0
    concurrency: int = 64
    limit: int | None = None
    quick: bool = False  # 5 s runs, one round: checks the pipeline, numbers not for the report


@dataclass(frozen=True)
class Setting:
    criterion: str
    speed: float
    test_accuracy: float
    mean_exit_layer: float


def float32_version(store: ModelStore, model: str, version: str | None) -> str:
    if version is not None:
        return version
    for candidate in reversed(store.list_versions(model)):
        if read_manifest(store.version_dir(model, candidate)).quantization == "none":
            return candidate
    raise ValueError(f"{model} has no float32 version in {store.root}")


def ensure_int8(source_dir: Path, model: str, out_dir: Path, data_dir: Path) -> tuple[Path, str]:
    """The int8 version of ``source_dir`` in ``out_dir/store-int8`` (made once, then reused)."""
    from model_store.training.pipeline import quantize_version

    source = read_manifest(source_dir)
    store_dir = out_dir / "store-int8"
    store = ModelStore(store_dir)
    for version in store.list_versions(model):
        manifest = read_manifest(store.version_dir(model, version))
        made_from = getattr(manifest.provenance, "quantized_from", None)
        if manifest.quantization == "int8_dynamic" and made_from == source.version:
            copied = read_manifest(store.version_dir(model, source.version))
            if copied.files == source.files:
                return store_dir, version
    shutil.rmtree(store_dir / model, ignore_errors=True)
    (store_dir / model).mkdir(parents=True)
    shutil.copytree(source_dir, store_dir / model / source.version)
    path = quantize_version(store_dir, model, source.version, "spamassassin", data_dir)
    return store_dir, path.name


def test_points(manifest: Manifest) -> list[Setting]:
    evaluation = getattr(manifest.provenance, "test_evaluation", None)
    if not isinstance(evaluation, dict):
        raise ValueError(f"{manifest.name} version {manifest.version} has no test evaluation")
    return [
        Setting(p["criterion"], float(p["speed"]), float(p["accuracy"]["all"]), float(p["mean_exit_layer"]))
        for p in evaluation["points"]
    ]


def full_depth(points: list[Setting]) -> Setting:
    return next(p for p in points if p.speed == 0.0)


def fastest_within(points: list[Setting], floor: float) -> Setting:
    """The fewest mean layers among settings with test accuracy >= ``floor`` (ties: more accurate)."""
    fitting = [p for p in points if p.test_accuracy >= floor - 1e-9]
    if not fitting:
        best = max(points, key=lambda p: p.test_accuracy)
        raise ValueError(
            f"no setting reaches {floor:.2%} on test (the best: {best.criterion} {best.speed:g} at "
            f"{best.test_accuracy:.2%}); allow a larger drop (--allowed-drop)"
        )
    return min(fitting, key=lambda p: (p.mean_exit_layer, -p.test_accuracy))


def run_int8(options: Int8Options) -> dict[str, Any]:
    o = options
    store = ModelStore(o.store)
    source_version = float32_version(store, o.model, o.version)
    source_dir = store.version_dir(o.model, source_version)
    int8_store, int8_version = ensure_int8(source_dir, o.model, o.out_dir, Path(".cache"))
    fp32_manifest = read_manifest(source_dir)
    int8_manifest = read_manifest(ModelStore(int8_store).version_dir(o.model, int8_version))
    fp32_points, int8_points = test_points(fp32_manifest), test_points(int8_manifest)
    fp32_full = full_depth(fp32_points)
    floor = fp32_full.test_accuracy - o.allowed_drop_pts / 100.0
    chosen = {
        "float32": fastest_within(fp32_points, floor),
        "int8": fastest_within(int8_points, floor),
    }
    print(
        f"int8: float32 v{source_version} full depth {fp32_full.test_accuracy:.2%} on test; budget "
        f">= {floor:.2%}; float32 runs {chosen['float32']}, int8 v{int8_version} runs {chosen['int8']}",
        flush=True,
    )

    examples = sample(load_split("test"), o.limit, 0)
    bench_options = BenchOptions(
        store=o.store, model=o.model, out_dir=o.out_dir / "int8", quick=o.quick, concurrency=o.concurrency
    )
    dataset = {"source": "SpamAssassin test split (model_store.data)", "num_examples": len(examples)}
    bench = Bench(options=bench_options, examples=examples, dataset=dataset)
    servers = {
        "float32": (o.store, source_version),
        "int8": (int8_store, int8_version),
    }
    machine_before = machine_info()
    rounds: list[dict[str, Any]] = []
    for round_index in range(1 if o.quick else o.num_rounds):
        results: dict[str, Any] = {}
        for kind, (store_dir, version) in servers.items():
            # Capacity, not admission: with no queue-wait bound a closed loop of 64 is queued, not refused.
            spec = exitserve_spec(
                f"int8-{kind}", store_dir, o.model, version, "refill", ("--max-queue-wait-ms", "none")
            )
            with running(spec, o.out_dir / "int8" / "logs") as server:
                setting = chosen[kind]
                early = bench.run(
                    f"int8-r{round_index}-{kind}-early-exit",
                    server,
                    "int8",
                    speeds=(setting.speed,),
                    criterion=setting.criterion,
                    max_requests=10**6,
                    max_duration_s=o.duration_s,
                )
                full = bench.run(
                    f"int8-r{round_index}-{kind}-full-depth",
                    server,
                    "int8",
                    speeds=(0.0,),
                    max_requests=10**6,
                    max_duration_s=o.duration_s,
                )
            results[kind] = {"early_exit": _figures(early), "full_depth": _figures(full)}
        results["ratio_early_exit"] = (
            results["int8"]["early_exit"]["throughput_rps"]
            / results["float32"]["early_exit"]["throughput_rps"]
        )
        results["ratio_full_depth"] = (
            results["int8"]["full_depth"]["throughput_rps"]
            / results["float32"]["full_depth"]["throughput_rps"]
        )
        print(
            f"int8 round {round_index}: early exit x{results['ratio_early_exit']:.2f}, "
            f"full depth x{results['ratio_full_depth']:.2f}",
            flush=True,
        )
        rounds.append(results)
    document = {
        "finished_at": now_iso(),
        "commit": git_commit(),
        "machine_before": machine_before,
        "machine_after": machine_info(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(o).items()},
        "float32_version": source_version,
        "int8_version": int8_version,
        "test_split": {
            "float32_full_depth": fp32_full.test_accuracy,
            "int8_full_depth": full_depth(int8_points).test_accuracy,
            "budget_floor": floor,
            "chosen": {k: asdict(v) for k, v in chosen.items()},
        },
        "rounds": rounds,
        "median_ratio_early_exit": statistics.median(r["ratio_early_exit"] for r in rounds),
        "median_ratio_full_depth": statistics.median(r["ratio_full_depth"] for r in rounds),
    }
    write_json(o.out_dir / "int8.json", document)
    return document


def _figures(document: dict[str, Any]) -> dict[str, Any]:
    r = document["results"]
    return {
        "throughput_rps": throughput(document),
        "accuracy": r["accuracy"],
        "mean_exit_layer": r["mean_exit_layer"],
        "p99_ms": r["latency_ms"]["p99"],
        "server_cpu_ms_per_request": r.get("server_cpu_ms_per_request"),
        "errors": r["errors_by_status"],
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def markdown_tables(document: dict[str, Any]) -> str:
    d = document
    t = d["test_split"]
    commit = d["commit"]
    machine = d["machine_before"]
    lines = [
        f"Measured {d['finished_at']} at commit `{str(commit.get('sha') or '')[:7]}`"
        f"{' (dirty)' if commit.get('dirty') else ''} on {machine['cpu']} x{machine['num_cpus']} "
        f"(1-min load {machine['load_average_1_5_15'][0]:.1f} before); `python -m loadtest int8`; "
        f"float32 version {d['float32_version']}, its int8 version {d['int8_version']}; real emails "
        "(SpamAssassin test split) through HTTP, closed loop.",
        "",
        "Test split: float32 full depth "
        f"{_pct(t['float32_full_depth'])}, int8 full depth {_pct(t['int8_full_depth'])} "
        f"({100 * (t['int8_full_depth'] - t['float32_full_depth']):+.2f} pt); budget: at least "
        f"{_pct(t['budget_floor'])}.",
        "",
        "| version | setting (fastest within the budget on test) | test accuracy | mean exit layer |",
        "|---|---|---|---|",
    ]
    for kind, s in t["chosen"].items():
        lines.append(
            f"| {kind} | {s['criterion']} {s['speed']:g} | {_pct(s['test_accuracy'])} | "
            f"{s['mean_exit_layer']:.2f} |"
        )
    lines += [
        "",
        "| round | run | float32 req/s | int8 req/s | int8 / float32 | served accuracy f32 / int8 | "
        "server CPU ms/req f32 / int8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(d["rounds"]):
        for run, ratio in (("early_exit", "ratio_early_exit"), ("full_depth", "ratio_full_depth")):
            f, q = r["float32"][run], r["int8"][run]
            cpu = [x["server_cpu_ms_per_request"] for x in (f, q)]
            cpu_text = " / ".join("n/a" if c is None else f"{c:.2f}" for c in cpu)
            lines.append(
                f"| {i} | {run.replace('_', ' ')} | {f['throughput_rps']:.1f} | {q['throughput_rps']:.1f} | "
                f"**{r[ratio]:.2f}x** | {_pct(f['accuracy'])} / {_pct(q['accuracy'])} | {cpu_text} |"
            )
    lines += [
        "",
        f"Median int8 / float32: early exit **{d['median_ratio_early_exit']:.2f}x**, full depth "
        f"**{d['median_ratio_full_depth']:.2f}x**.",
    ]
    return "\n".join(lines)


def update_markdown(document: dict[str, Any], path: Path) -> None:
    text = path.read_text()
    block = f"{BEGIN}\n{markdown_tables(document)}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n## int8 on CPU, with early exit\n\n" + block + "\n"
    path.write_text(text)


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]
