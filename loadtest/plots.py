"""The four plots of BENCHMARKS.md (PNG, matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from loadtest.results import ACCURACY_TOLERANCE, results, rps, sweep

COLORS = {"refill": "tab:blue", "shrink": "tab:orange", "pipeline": "tab:red", "tiny": "tab:green"}


def _speeds_and(points: list[tuple[float, dict[str, Any]]], key: str, sub: str | None = None) -> tuple:
    xs, ys = [], []
    for speed, doc in points:
        value = results(doc)[key] if sub is None else results(doc)[key][sub]
        if value is not None:
            xs.append(speed)
            ys.append(value)
    return xs, ys


def throughput_latency(runs: dict[str, dict[str, Any]], path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target in ("refill", "shrink"):
        points = sweep(runs, target)
        label = "exitserve, early exit + refill" if target == "refill" else "exitserve, shrink (no refill)"
        left.plot(*_speeds_and(points, "throughput_rps"), "o-", color=COLORS[target], label=label)
        for sub, style in (("p50", "o-"), ("p99", "s--")):
            right.plot(
                *_speeds_and(points, "latency_ms", sub), style, color=COLORS[target], label=f"{sub}, {target}"
            )
    if "pipeline" in runs:
        pipeline = results(runs["pipeline"])
        left.axhline(
            pipeline["throughput_rps"],
            color=COLORS["pipeline"],
            ls=":",
            label="pipeline baseline (batch 1, full depth)",
        )
        for sub, ls in (("p50", ":"), ("p99", "-.")):
            if pipeline["latency_ms"][sub] is not None:
                right.axhline(
                    pipeline["latency_ms"][sub], color=COLORS["pipeline"], ls=ls, label=f"{sub}, pipeline"
                )
    left.set(xlabel="speed (0 = full depth)", ylabel="throughput (req/s)", title="Closed-loop throughput")
    left.set_ylim(bottom=0)
    right.set(
        xlabel="speed (0 = full depth)",
        ylabel="latency (ms)",
        yscale="log",
        title="Closed-loop latency (same concurrency)",
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_speedup(runs: dict[str, dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    full = runs.get("refill-speed-0")
    if full is None:
        plt.close(fig)
        return path
    full_rps, full_acc = rps(full), results(full)["accuracy"]
    for target in ("refill", "shrink"):
        points = [(s, d) for s, d in sweep(runs, target) if results(d)["accuracy"] is not None]
        xs = [rps(d) / full_rps for _, d in points]
        ys = [results(d)["accuracy"] * 100 for _, d in points]
        # markers only: in speed order the points need not move right monotonically (noise, front end)
        ax.plot(xs, ys, "o" if target == "refill" else "s", color=COLORS[target], label=f"exitserve {target}")
        for (speed, _), x, y in zip(points, xs, ys, strict=True):
            ax.annotate(f"{speed:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if "pipeline" in runs and results(runs["pipeline"])["accuracy"] is not None:
        pipeline = runs["pipeline"]
        ax.plot(
            [rps(pipeline) / full_rps],
            [results(pipeline)["accuracy"] * 100],
            "D",
            color=COLORS["pipeline"],
            label="pipeline baseline",
        )
    if full_acc is not None:
        ax.axhline(
            (full_acc - ACCURACY_TOLERANCE) * 100, color="gray", ls="--", lw=1, label="full depth − 0.5 pt"
        )
    ax.set(
        xlabel="throughput speed-up over full depth (refill, speed 0)",
        ylabel="accuracy (%)",
        title="Accuracy vs speed-up (labels: speed)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def exit_layers(runs: dict[str, dict[str, Any]], path: Path) -> Path:
    points = sweep(runs, "refill")
    fig, ax = plt.subplots(figsize=(7, 0.55 * max(len(points), 3) + 1.4))
    num_layers = max((int(k) for _, d in points for k in results(d)["exit_layer_histogram"]), default=1)
    cmap = plt.get_cmap("viridis", num_layers)
    for row, (_speed, doc) in enumerate(points):
        histogram = results(doc)["exit_layer_histogram"]
        total = sum(histogram.values()) or 1
        left = 0.0
        for layer in range(1, num_layers + 1):
            share = histogram.get(str(layer), 0) / total
            ax.barh(
                row, share, left=left, color=cmap(layer - 1), label=f"layer {layer}" if row == 0 else None
            )
            left += share
    ax.set_yticks(range(len(points)), [f"speed {s:g}" for s, _ in points])
    ax.set(xlabel="share of requests", title="Exit layer per speed (exitserve, refill)", xlim=(0, 1))
    ax.legend(fontsize=7, ncol=min(num_layers, 6), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_cdf(index: dict[str, Any], runs: dict[str, dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, doc in sorted(runs.items()):
        if doc.get("group") != "common" or not doc.get("latencies_ms"):
            continue
        latencies = doc["latencies_ms"]
        n = len(latencies)
        ys = [(i + 1) / n for i in range(n)]
        color = COLORS["pipeline"] if name.startswith("pipeline") else None
        ax.step(
            latencies, ys, where="post", label=name.replace("-open70", "").replace("-common", ""), color=color
        )
    rate = index.get("common_rate_per_s")
    ax.set(
        xscale="log",
        xlabel="latency (ms)",
        ylabel="fraction of requests ≤ latency",
        title=f"Latency CDF, open loop at {rate:.1f} req/s (70 % of the pipeline's capacity)"
        if rate
        else "Latency CDF",
    )
    ax.axhline(0.99, color="gray", lw=0.8, ls=":")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(index: dict[str, Any], runs: dict[str, dict[str, Any]], plot_dir: Path) -> list[Path]:
    plot_dir.mkdir(parents=True, exist_ok=True)
    return [
        throughput_latency(runs, plot_dir / "bench-throughput-latency.png"),
        accuracy_speedup(runs, plot_dir / "bench-accuracy-speedup.png"),
        exit_layers(runs, plot_dir / "bench-exit-layers.png"),
        latency_cdf(index, runs, plot_dir / "bench-latency-cdf.png"),
    ]
