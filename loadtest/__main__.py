"""``python -m loadtest``: bounded load runs, the standard benchmark set, and the tiny model helper."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from loadtest.dataset import DatasetError, Example, load_jsonl, load_split, sample
from loadtest.generator import LoadSettings, run_load_sync
from loadtest.machine import now_iso
from loadtest.progress import stderr_progress
from loadtest.report import describe_target, run_document, write_json
from loadtest.safety import NotLoopbackError, require_loopback
from loadtest.servers import ServerStartError


def parse_speeds(text: str) -> tuple[float | None, ...]:
    """``"0,0.2,0.5"`` -> (0.0, 0.2, 0.5); ``"default"`` -> (None,) = the server's default speed."""
    speeds: list[float | None] = []
    for part in text.split(","):
        part = part.strip()
        speeds.append(None if part in ("default", "") else float(part))
    return tuple(speeds)


def load_examples(
    dataset: str | None, split: str, limit: int | None, seed: int
) -> tuple[list[Example], dict]:
    """The run's inputs and a description of them for the report."""
    if dataset:
        examples, source = load_jsonl(dataset), str(dataset)
    else:
        examples, source = load_split(split), f"model_store.data split={split}"
    chosen = sample(examples, limit, seed)
    return chosen, {"source": source, "num_examples": len(chosen), "seed": seed}


def add_input_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", help="JSONL file of {text, label} (default: model_store.data split)")
    parser.add_argument("--split", default="test", help="dataset split when --dataset is not given")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many examples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example shuffle and arrivals")


def cmd_run(args: argparse.Namespace) -> int:
    examples, dataset = load_examples(args.dataset, args.split, args.limit, args.seed)
    settings = LoadSettings(
        url=args.url,
        mode=args.mode,
        concurrency=args.concurrency,
        rate_per_s=args.rate,
        max_requests=args.max_requests,
        max_duration_s=args.max_duration_s,
        speeds=parse_speeds(args.speeds),
        criterion=args.criterion,
        max_accuracy_drop=args.max_accuracy_drop,
        seed=args.seed,
        request_timeout_s=args.timeout_s,
        num_warmup_requests=args.warmup,
        allow_remote=args.allow_remote,
        api_key=args.api_key,
        inputs_per_request=args.inputs_per_request,
        protocol=args.protocol,
        model=args.model,
    )
    target = describe_target(settings.url, settings.api_key)
    started_at = now_iso()
    progress = stderr_progress(args.name, settings.max_requests, settings.max_duration_s, args.quiet)
    result = run_load_sync(settings, examples, progress)
    document = run_document(args.name, result, dataset, target, started_at)
    if args.save_records:
        document["records"] = [asdict(r) for r in result.records]
    path = write_json(Path(args.out) if args.out else Path("bench-out") / f"{args.name}.json", document)
    s = result.summary
    lat = s["latency_ms"]
    print(
        f"{args.name}: {s['num_ok']}/{s['num_requests']} ok, {s['throughput_rps']:.1f} req/s, "
        f"p50 {lat['p50'] or float('nan'):.1f} ms, p99 {lat['p99'] or float('nan'):.1f} ms, "
        f"accuracy {s['accuracy'] if s['accuracy'] is not None else 'n/a'}, errors {s['errors_by_status']} "
        f"-> {path}"
    )
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from loadtest.tiny import make_tiny_store

    path = make_tiny_store(args.store, name=args.name, max_seq_length=args.max_seq_length)
    print(path)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_bench(args: argparse.Namespace) -> int:
    from loadtest.bench import BenchOptions, run_bench

    signal.signal(signal.SIGTERM, _interrupt)  # like Ctrl-C: the servers it started are stopped

    options = BenchOptions(
        store=Path(args.store),
        model=args.model,
        out_dir=Path(args.out_dir),
        dataset=args.dataset,
        split=args.split,
        limit=args.limit,
        seed=args.seed,
        quick=args.quick,
        write_markdown=not args.no_markdown,
    )
    return run_bench(options)


def cmd_overload(args: argparse.Namespace) -> int:
    from loadtest.overload import OverloadOptions, markdown_table, run_overload

    signal.signal(signal.SIGTERM, _interrupt)  # the server it started is stopped
    if args.url is not None:
        require_loopback(args.url)
    options = OverloadOptions(
        store=Path(args.store),
        model=args.model,
        url=args.url,
        out_dir=Path(args.out_dir),
        factors=tuple(float(f) for f in args.factors.split(",")),
        deadline_modes=tuple(
            None if d.strip().lower() == "none" else int(d) for d in args.deadlines_ms.split(",")
        ),
        duration_s=args.duration_s,
        capacity_s=args.capacity_s,
        recovery_s=args.recovery_s,
        num_words=args.num_words,
        server_args=tuple(args.server_arg),
    )
    document = run_overload(options)
    print(markdown_table(document))
    print(f"-> {options.out_dir / 'overload.json'}")
    return 0


def cmd_int8(args: argparse.Namespace) -> int:
    from loadtest.int8 import Int8Options, markdown_tables, run_int8, update_markdown

    signal.signal(signal.SIGTERM, _interrupt)  # the server it started is stopped
    options = Int8Options(
        store=Path(args.store),
        model=args.model,
        version=args.version,
        out_dir=Path(args.out_dir),
        allowed_drop_pts=args.allowed_drop,
        num_rounds=args.rounds,
        duration_s=args.duration_s,
        concurrency=args.concurrency,
        limit=args.limit,
        quick=args.quick,
    )
    document = run_int8(options)
    print(markdown_tables(document))
    if not args.no_markdown and not args.quick:
        update_markdown(document, Path("BENCHMARKS.md"))
    print(f"-> {options.out_dir / 'int8.json'}")
    return 0


def cmd_beyond(args: argparse.Namespace) -> int:
    from loadtest.beyond import BeyondOptions, markdown_tables, run_beyond, update_markdown

    signal.signal(signal.SIGTERM, _interrupt)  # the server it started is stopped
    if args.url is not None:
        require_loopback(args.url)
    options = BeyondOptions(
        store=Path(args.store),
        model=args.model,
        url=args.url,
        out_dir=Path(args.out_dir),
        overload_factor=args.overload_factor,
        overload_s=args.overload_s,
        deadline_ms=args.deadline_ms,
        allowed_drop_pts=args.allowed_drop,
        steady_s=args.steady_s,
        capacity_s=args.capacity_s,
        server_args=tuple(args.server_arg),
    )
    document = run_beyond(options)
    print(markdown_tables(document))
    if not args.no_markdown:
        update_markdown(document, Path("BENCHMARKS.md"))
    print(f"-> {options.out_dir / 'beyond.json'}")
    return 0


def cmd_connections(args: argparse.Namespace) -> int:
    from loadtest.connections import ConnectionsOptions, run_connections

    signal.signal(signal.SIGTERM, _interrupt)
    options = ConnectionsOptions(
        store=Path(args.store),
        model=args.model,
        out_dir=Path(args.out_dir),
        num_idle=args.idle,
        num_slow=args.slow,
        num_floods=args.floods,
        duration_s=args.duration_s,
        server_nofile=None if args.server_nofile.lower() == "none" else int(args.server_nofile),
    )
    document = run_connections(options)
    keys = ("baseline_ms", "under_attack_ms", "p99_ratio", "rss_growth_mib", "idle")
    print(json.dumps({k: document[k] for k in keys}, indent=2))
    return 0


def cmd_ceiling(args: argparse.Namespace) -> int:
    from loadtest.ceiling import main_options, markdown, run_ceiling

    signal.signal(signal.SIGTERM, _interrupt)
    document = run_ceiling(main_options(args))
    print(markdown(document))
    return 0


def cmd_hostcost(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from loadtest.hostcost import carried_step_us, host_step_us
    from loadtest.tiny import make_tiny_store

    torch.set_num_threads(1)  # as the server sets it on 2 cores
    batches = tuple(int(n) for n in args.batches.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        make_tiny_store(store, "tiny-1layer", max_seq_length=128)
        make_tiny_store(store, "tiny-3layer", max_seq_length=128, num_layers=3)
        kind = "cached kernels" if args.cached_kernels else "kernels timed and subtracted"
        for _ in range(args.rounds):
            turnover = host_step_us(
                store, "tiny-1layer", batches, args.steps, cached_kernels=args.cached_kernels
            )
            carried = carried_step_us(
                store, "tiny-3layer", batches, args.steps, cached_kernels=args.cached_kernels
            )
            cells = ", ".join(f"{b}: {turnover[str(b)]:.0f} / {carried[str(b)]:.0f}" for b in batches)
            print(f"host us per step, turnover / carried, by batch ({kind}): {cells}", flush=True)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from loadtest.bench import write_outputs

    write_outputs(Path(args.out_dir), write_markdown=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="one bounded run against a loopback server")
    run.add_argument(
        "--url", default="http://127.0.0.1:8000", help="server base URL (loopback unless --allow-remote)"
    )
    run.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback URL: your own deployment (http or https)",
    )
    run.add_argument(
        "--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (never written out)"
    )
    run.add_argument("--inputs-per-request", type=int, default=1, help="texts per request (batched inputs)")
    run.add_argument("--protocol", choices=["v1", "v2"], default="v1", help="v1 classify or v2 infer route")
    run.add_argument("--model", default=None, help="v2: model name in the route (default: from /v1/models)")
    run.add_argument("--mode", choices=["closed", "open"], default="closed")
    run.add_argument(
        "--concurrency", type=int, default=32, help="closed loop: requests in flight; open loop: connections"
    )
    run.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrival rate, req/s")
    run.add_argument("--max-requests", type=int, default=1000)
    run.add_argument("--max-duration-s", type=float, default=30.0)
    run.add_argument("--speeds", default="default", help="comma-separated mix, e.g. 0,0.2,0.5")
    run.add_argument("--criterion", default=None)
    run.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=None,
        help="ask for an accuracy target (points below full depth) instead of a speed",
    )
    run.add_argument("--timeout-s", type=float, default=30.0, help="per-request timeout")
    run.add_argument("--warmup", type=int, default=10, help="unrecorded requests before the run")
    run.add_argument("--name", default="run", help="run name (JSON file name)")
    run.add_argument("--out", default=None, help="JSON output path (default: bench-out/NAME.json)")
    run.add_argument("--quiet", action="store_true", help="no live progress")
    run.add_argument("--save-records", action="store_true", help="also write every request's record")
    add_input_args(run)
    run.set_defaults(func=cmd_run)

    bench = sub.add_parser("bench", help="the standard set: starts the servers, runs, plots, BENCHMARKS.md")
    bench.add_argument("--store", default="store")
    bench.add_argument("--model", default="spam-minilm")
    bench.add_argument("--out-dir", default="bench-out")
    bench.add_argument("--quick", action="store_true", help="short runs (smoke test of the pipeline)")
    bench.add_argument("--no-markdown", action="store_true", help="do not rewrite BENCHMARKS.md/docs plots")
    add_input_args(bench)
    bench.set_defaults(func=cmd_bench)

    tiny = sub.add_parser("make-tiny", help="save a random 1-layer BERT with the MiniLM tokenizer")
    tiny.add_argument("--store", default="bench-out/store-tiny")
    tiny.add_argument("--name", default="tiny-1layer")
    tiny.add_argument("--max-seq-length", type=int, default=128)
    tiny.set_defaults(func=cmd_make_tiny)

    overload = sub.add_parser(
        "overload", help="goodput at 1.2-2x capacity with the server's defaults (RELIABILITY.md)"
    )
    overload.add_argument("--store", default="store")
    overload.add_argument("--model", default="spam-minilm")
    overload.add_argument("--url", default=None, help="a running loopback server instead of starting one")
    overload.add_argument("--out-dir", default="bench-out")
    overload.add_argument("--factors", default="1.2,1.5,2", help="offered load as multiples of capacity")
    overload.add_argument(
        "--deadlines-ms", default="1000,none", help="deadline_ms per request per scenario; none = no deadline"
    )
    overload.add_argument("--duration-s", type=float, default=60.0, help="seconds of overload per scenario")
    overload.add_argument("--capacity-s", type=float, default=15.0)
    overload.add_argument("--recovery-s", type=float, default=5.0)
    overload.add_argument("--num-words", type=int, default=40, help="texts cut to this many words")
    overload.add_argument(
        "--server-arg", action="append", default=[], help="extra server flag (repeat); none = the defaults"
    )
    overload.set_defaults(func=cmd_overload)

    beyond = sub.add_parser(
        "beyond", help="degrade vs 429 under 2x overload, and anytime answers at a deadline (BENCHMARKS.md)"
    )
    beyond.add_argument("--store", default="store")
    beyond.add_argument("--model", default="spam-minilm")
    beyond.add_argument("--url", default=None, help="a running loopback server instead of starting one")
    beyond.add_argument("--out-dir", default="bench-out")
    beyond.add_argument("--overload-factor", type=float, default=2.0, help="offered load x capacity")
    beyond.add_argument("--overload-s", type=float, default=60.0, help="seconds of overload per policy")
    beyond.add_argument("--deadline-ms", type=int, default=1000, help="deadline of the overload requests")
    beyond.add_argument("--allowed-drop", type=float, default=1.0, help="degrade policy: accuracy points")
    beyond.add_argument("--steady-s", type=float, default=30.0, help="seconds per anytime phase")
    beyond.add_argument("--capacity-s", type=float, default=15.0)
    beyond.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    beyond.add_argument("--no-markdown", action="store_true", help="do not rewrite BENCHMARKS.md")
    beyond.set_defaults(func=cmd_beyond)

    int8 = sub.add_parser(
        "int8", help="int8 + early exit vs float32 + early exit through HTTP, one run (BENCHMARKS.md)"
    )
    int8.add_argument("--store", default="store")
    int8.add_argument("--model", default="spam-minilm")
    int8.add_argument("--version", default=None, help="float32 source version (default: latest float32)")
    int8.add_argument("--out-dir", default="bench-out")
    int8.add_argument("--allowed-drop", type=float, default=0.5, help="points below float32 full depth")
    int8.add_argument("--rounds", type=int, default=2, help="float32/int8 pairs, run alternately")
    int8.add_argument("--duration-s", type=float, default=30.0, help="seconds per run")
    int8.add_argument("--concurrency", type=int, default=64)
    int8.add_argument("--limit", type=int, default=None, help="use at most this many test emails")
    int8.add_argument("--quick", action="store_true", help="5 s runs, one round (a pipeline check)")
    int8.add_argument("--no-markdown", action="store_true", help="do not rewrite BENCHMARKS.md")
    int8.set_defaults(func=cmd_int8)

    conns = sub.add_parser(
        "connections", help="normal requests while idle, slow and flooding clients attack (RELIABILITY.md)"
    )
    conns.add_argument("--store", default="store")
    conns.add_argument("--model", default="spam-minilm")
    conns.add_argument("--out-dir", default="bench-out")
    conns.add_argument("--idle", type=int, default=1100, help="sockets that connect and send nothing")
    conns.add_argument("--slow", type=int, default=50, help="clients sending a request head at 1 byte/s")
    conns.add_argument("--floods", type=int, default=10, help="clients streaming an endless header line")
    conns.add_argument("--duration-s", type=float, default=15.0)
    conns.add_argument(
        "--server-nofile", default="1024", help="the server's open-file limit; none = inherited"
    )
    conns.set_defaults(func=cmd_connections)

    ceiling = sub.add_parser(
        "ceiling", help="wrk: FastAPI hello-world vs exitserve on the tiny model; host cost per step"
    )
    ceiling.add_argument("--store", default="store", help="store of the default model (core vs HTTP)")
    ceiling.add_argument("--model", default="spam-minilm")
    ceiling.add_argument("--out-dir", default="bench-out")
    ceiling.add_argument("--frontends", default="1,2", help="comma-separated --frontends values to run")
    ceiling.add_argument("--duration-s", type=float, default=10.0)
    ceiling.add_argument("--connections", type=int, default=64)
    ceiling.add_argument(
        "--rounds", type=int, default=3, help="times the whole set runs, servers taking turns (medians)"
    )
    ceiling.add_argument("--skip-default-model", action="store_true", help="no core-vs-HTTP run")
    ceiling.add_argument(
        "--skip-emails", action="store_true", help="no SpamAssassin emails (implies the above)"
    )
    ceiling.add_argument("--no-markdown", action="store_true", help="do not rewrite BENCHMARKS.md")
    ceiling.set_defaults(func=cmd_ceiling)

    hostcost = sub.add_parser(
        "hostcost", help="the engine core's host time per layer step on the tiny models (as in the ceiling)"
    )
    hostcost.add_argument("--batches", default="1,16,64")
    hostcost.add_argument("--steps", type=int, default=300, help="timed steps per batch size (median)")
    hostcost.add_argument("--rounds", type=int, default=1)
    hostcost.add_argument(
        "--cached-kernels",
        action="store_true",
        help="replace the model's computations by cached outputs (host time only; for A/B of host code)",
    )
    hostcost.set_defaults(func=cmd_hostcost)

    sub.add_parser(
        "gpu-efficiency",
        help="engine efficiency on a GPU: early exit vs the ideal speed-up, eager and CUDA graphs, fp16 and "
        "bf16 (no HTTP stack; see loadtest/gpu_efficiency.py, --help there)",
        add_help=False,
    )
    report = sub.add_parser("report", help="re-draw plots and BENCHMARKS.md from a bench output dir")
    report.add_argument("--out-dir", default="bench-out")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gpu-efficiency"]:
        # Its own parser, and none of this module's HTTP imports matter there: the device machine has
        # no fastapi; ``python -m loadtest.gpu_efficiency`` is the same command.
        from loadtest.gpu_efficiency import main as gpu_efficiency

        return gpu_efficiency(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (NotLoopbackError, DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ServerStartError as e:
        print(f"error: a server did not start: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
