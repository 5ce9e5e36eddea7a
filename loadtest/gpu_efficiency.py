"""``python -m loadtest.gpu_efficiency`` (also ``python -m loadtest gpu-efficiency``): how much of the
ideal early-exit speed-up the engine keeps on a GPU.

No HTTP stack: the engine's own scheduler and runner (``server/engine``) are driven directly, so this runs
on a machine with torch and transformers but without fastapi or uvicorn (the device machine), given
pydantic for the manifest types. On a 12-layer BERT-base-shaped encoder with random weights (speed does
not depend on the weights), at 128 tokens per row, for float16 and bfloat16, eager and CUDA graphs:

* full depth through the engine at batch 1 ... 1024 (rows/s; the library's own full forward beside it);
* early exit through the engine, refill batching, for an easy and a medium exit mix (each row's exit
  layer drawn from a fixed distribution and enforced with its ``max_layers``, so the mix does not depend
  on random ramps), at batch 32, 128 and 512;
* engine efficiency = early-exit rows/s / (best full-depth rows/s at that batch x L / mean exit layers);
* batch-1 full-depth latency.

Prints a markdown table and writes JSON (``--out``). Sized to finish in a few minutes on an H100/H200
(an estimate: not yet run on one).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_store.early_exit import EarlyExitClassifier
from server.engine.graphs import EagerReplayBackend
from server.engine.runner import Runner
from server.engine.scheduler import RowExit, RowSpec, Scheduler, SchedulerConfig

NUM_LAYERS = 12
SEQ_LEN = 128
EXIT_MIXES: dict[str, dict[int, float]] = {
    # exit layer -> share of rows (means ~2.1 and ~4.7 of 12 layers)
    "easy": {1: 0.55, 2: 0.25, 3: 0.08, 4: 0.05, 6: 0.04, 12: 0.03},
    "medium": {1: 0.2, 2: 0.2, 3: 0.15, 4: 0.1, 6: 0.1, 8: 0.1, 12: 0.15},
}
FULL_DEPTH_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
EARLY_EXIT_BATCHES = (32, 128, 512)


def bert_base(num_labels: int = 2, hidden_size: int = 768) -> EarlyExitClassifier:
    """The BERT-base shape (12 layers, hidden 768, 12 heads); a smaller ``hidden_size`` for CPU tests."""
    from transformers import BertConfig

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=hidden_size,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=max(1, hidden_size // 64),
        intermediate_size=4 * hidden_size,
    )
    return EarlyExitClassifier.from_config(config, num_labels).eval()


def make_rows(num_rows: int, exit_layers: list[int], seed: int, first_id: int = 1) -> list[RowSpec]:
    """Rows of SEQ_LEN random tokens; never confident (speed 0), each leaves at its ``max_layers``."""
    rng = random.Random(seed)
    return [
        RowSpec(
            row_id=first_id + i,
            request_id=first_id + i,
            token_ids=tuple(rng.randrange(1000, 29000) for _ in range(SEQ_LEN)),
            criterion_code=0,
            threshold=0.0,
            max_layers=exit_layers[i % len(exit_layers)],
        )
        for i in range(num_rows)
    ]


def draw_exit_layers(mix: dict[int, float], num_rows: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    layers, weights = zip(*mix.items(), strict=True)
    return rng.choices(layers, weights=weights, k=num_rows)


@dataclass
class DriveResult:
    num_rows: int
    seconds: float
    num_steps: int
    exit_layers: list[int] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.num_rows / self.seconds

    @property
    def mean_exit_layer(self) -> float:
        return sum(self.exit_layers) / len(self.exit_layers)


def drive(
    runner: Runner,
    rows: list[RowSpec],
    batch_size: int,
    max_inflight_rows: int | None = None,
    on_exit: Callable[[RowExit], None] | None = None,
) -> DriveResult:
    """Serve ``rows`` through the engine's scheduler (refill) and runner, the queue kept topped up to a
    batch ahead of what is in flight, until every row is answered. Synchronises the device at the end."""
    scheduler = Scheduler(
        SchedulerConfig(
            max_batch_size=batch_size,
            max_batch_tokens=batch_size * SEQ_LEN,
            max_wait_ms=0.0,
            max_queue_size=len(rows) + 1,
            num_layers=runner.num_layers,
            max_inflight_rows=max_inflight_rows,
            max_queue_wait_ms=None,
        )
    )
    pending: Iterator[RowSpec] = iter(rows)
    num_left = len(rows)
    exit_layers: list[int] = []
    num_steps = 0
    _sync(runner.device)
    started = time.perf_counter()
    while num_left:
        while scheduler.num_waiting < batch_size:
            row = next(pending, None)
            if row is None:
                break
            scheduler.add_rows([row], time.perf_counter())
        plan = scheduler.schedule(time.perf_counter()).plan
        if plan is None:
            continue
        output = runner.execute(plan)
        num_steps += 1
        for _, row_exit in scheduler.update_from_output(plan, output):
            exit_layers.append(row_exit.exit_layer)
            num_left -= 1
            if on_exit is not None:
                on_exit(row_exit)
    _sync(runner.device)
    return DriveResult(len(rows), time.perf_counter() - started, num_steps, exit_layers)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def library_full_depth(model: EarlyExitClassifier, batch: int, repeats: int) -> float:
    """rows/s of the library's own forward (all layers at once) plus the last ramp."""
    device = next(model.parameters()).device
    ids = torch.randint(1000, 29000, (batch, SEQ_LEN), device=device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        for _ in range(2):
            model.encoder(input_ids=ids, attention_mask=mask)
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            model.ramp_logits(NUM_LAYERS, hidden, mask).cpu()
        return batch * repeats / (time.perf_counter() - start)


@dataclass(frozen=True)
class Options:
    dtypes: tuple[str, ...] = ("float16", "bfloat16")
    modes: tuple[str, ...] = ("eager", "graphs")
    full_depth_batches: tuple[int, ...] = FULL_DEPTH_BATCHES
    early_exit_batches: tuple[int, ...] = EARLY_EXIT_BATCHES
    inflight_factor: int = 4  # rows in flight = this x the batch (refill keeps each depth's steps full)
    min_rows: int = 2048  # rows per early-exit measurement (at least 8 batches)
    full_depth_rows: int = 256  # rows per full-depth measurement (at least 2 batches)
    out: Path | None = None
    device: str = "cuda"  # cpu: a pipeline check only (graphs then replay eagerly, EagerReplayBackend)
    hidden_size: int = 768


def run(options: Options) -> dict[str, Any]:
    cuda = options.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu-efficiency needs a CUDA device")
    device_name = torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    base = bert_base(hidden_size=options.hidden_size)
    results: dict[str, Any] = {
        "device": device_name,
        "torch": torch.__version__,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "runs": [],
    }
    started = time.perf_counter()
    largest = max(*options.full_depth_batches, *options.early_exit_batches)
    for dtype in options.dtypes:
        for mode in options.modes:
            model = bert_base(hidden_size=options.hidden_size)
            model.load_state_dict(base.state_dict())
            runner = Runner(
                model,
                device=options.device,
                dtype=dtype,
                cuda_graphs=mode == "graphs",
                max_batch_size=largest,
                max_seq_length=SEQ_LEN,
                graph_backend=EagerReplayBackend() if mode == "graphs" and not cuda else None,
                graph_seq_buckets=(SEQ_LEN,),
            )
            capture = asdict(runner.capture_report) if runner.capture_report else None
            if capture:
                print(f"{dtype} graphs: {capture['num_graphs']} captured in {capture['seconds']:.1f} s, "
                      f"{capture['memory_bytes'] / 2**20:.0f} MiB", flush=True)  # fmt: skip
            run_doc: dict[str, Any] = {"dtype": dtype, "mode": mode, "capture": capture, "full_depth": {}}
            for batch in options.full_depth_batches:
                rows = make_rows(batch * max(2, options.full_depth_rows // batch), [NUM_LAYERS], seed=batch)
                drive(runner, rows[:batch], batch)  # warm-up
                result = drive(runner, rows, batch)
                run_doc["full_depth"][batch] = result.rows_per_s
                if batch == 1:
                    latency = []
                    for row in rows[:20]:
                        one = drive(runner, [row], 1)
                        latency.append(one.seconds)
                    run_doc["batch1_latency_ms"] = 1000 * sorted(latency)[len(latency) // 2]
            if mode == "eager":
                run_doc["library_full_depth"] = {
                    b: library_full_depth(runner.model, b, max(2, 128 // b))
                    for b in options.full_depth_batches
                }
            run_doc["early_exit"] = {}
            for mix_name, mix in EXIT_MIXES.items():
                for batch in options.early_exit_batches:
                    num_rows = max(options.min_rows, 8 * batch)
                    layers = draw_exit_layers(mix, num_rows, seed=batch)
                    rows = make_rows(num_rows, layers, seed=batch + 7)
                    inflight = options.inflight_factor * batch
                    drive(runner, rows[: 2 * batch], batch, inflight)  # warm-up
                    result = drive(runner, rows, batch, inflight)
                    run_doc["early_exit"][f"{mix_name}@{batch}"] = {
                        "rows_per_s": result.rows_per_s,
                        "mean_exit_layer": result.mean_exit_layer,
                        "num_steps": result.num_steps,
                    }
            results["runs"].append(run_doc)
            print(f"{dtype} {mode}: done at {time.perf_counter() - started:.0f} s", flush=True)
            del runner, model
            if cuda:
                torch.cuda.empty_cache()
    _efficiency(results)
    results["elapsed_s"] = time.perf_counter() - started
    if options.out is not None:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _efficiency(results: dict[str, Any]) -> None:
    """Efficiency against the best full depth of the same dtype at the same batch (either mode)."""
    for run_doc in results["runs"]:
        same = [r for r in results["runs"] if r["dtype"] == run_doc["dtype"]]
        for key, ee in run_doc["early_exit"].items():
            batch = int(key.split("@")[1])
            best_full = max(r["full_depth"][batch] for r in same)
            ideal = best_full * NUM_LAYERS / ee["mean_exit_layer"]
            ee["ideal_rows_per_s"] = ideal
            ee["efficiency"] = ee["rows_per_s"] / ideal


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Device: {results['device']}, torch {results['torch']}; 12-layer BERT-base shape, {SEQ_LEN} tokens.",
        "",
    ]
    batches = sorted({int(b) for r in results["runs"] for b in r["full_depth"]})
    lines.append(
        "| dtype | mode | batch-1 latency ms | " + " | ".join(f"rows/s @{b}" for b in batches) + " |"
    )
    lines.append("|---|---|---|" + "---|" * len(batches))
    for r in results["runs"]:
        cells = " | ".join(f"{r['full_depth'][b] if b in r['full_depth'] else r['full_depth'][str(b)]:.0f}"
                           for b in batches)  # fmt: skip
        lines.append(
            f"| {r['dtype']} | {r['mode']} | {r.get('batch1_latency_ms', float('nan')):.2f} | {cells} |"
        )
        lib = r.get("library_full_depth")
        if lib:
            cells = " | ".join(f"{lib[b] if b in lib else lib[str(b)]:.0f}" for b in batches)
            lines.append(f"| {r['dtype']} | library forward | | {cells} |")
    lines += ["", "| dtype | mode | mix @ batch | mean exit layer | rows/s | ideal rows/s | efficiency |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["runs"]:
        for key, ee in r["early_exit"].items():
            lines.append(
                f"| {r['dtype']} | {r['mode']} | {key} | {ee['mean_exit_layer']:.2f} | "
                f"{ee['rows_per_s']:.0f} | {ee['ideal_rows_per_s']:.0f} | "
                f"**{100 * ee['efficiency']:.1f} %** |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.gpu_efficiency", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out/gpu-efficiency.json"))
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--modes", default="eager,graphs")
    parser.add_argument("--inflight-factor", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="small batches only (a pipeline check)")
    args = parser.parse_args(argv)
    options = Options(
        dtypes=tuple(args.dtypes.split(",")),
        modes=tuple(args.modes.split(",")),
        inflight_factor=args.inflight_factor,
        out=args.out,
    )
    if args.quick:
        options = Options(
            dtypes=options.dtypes, modes=options.modes, full_depth_batches=(1, 8, 32),
            early_exit_batches=(32,), min_rows=256, out=options.out,
        )  # fmt: skip
    results = run(options)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
