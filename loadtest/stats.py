"""Summaries of a run: throughput, latency percentiles, errors by status, accuracy, exit layers."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

PERCENTILES = (50.0, 90.0, 99.0)


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request of a run."""

    index: int  # order in the run, from 0
    example_index: int
    speed: float | None
    scheduled_s: float  # when it was due, seconds from the run start (open loop: the Poisson time)
    sent_s: float  # when the client actually sent it (>= scheduled_s; the gap is client lag)
    latency_s: float  # from scheduled_s to the reply (open loop counts client lag: no coordinated omission)
    status: str  # HTTP status code as a string, or "transport:<Error>" / "cancelled"
    expected_label: str | None
    predicted_label: str | None = None
    exit_layer: int | None = None
    # Requests of several inputs (``--inputs-per-request``): the fields above are the first input's;
    # these count all of them.
    num_inputs: int = 1
    num_correct: int | None = None  # of the inputs with a known label, how many were answered right
    num_labelled: int = 0
    exit_layers: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "200"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks.

    Same definition as ``numpy.percentile(..., method="linear")``: position ``q/100 * (n - 1)`` in the
    sorted values; e.g. the p90 of 1..10 is 9.1. NaN for no values.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    position = q / 100.0 * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    fraction = position - lower
    return ordered[lower] + (ordered[upper] - ordered[lower]) * fraction


def latency_summary_ms(latencies_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99, mean and max in milliseconds (None where there are no values)."""
    if not latencies_s:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    summary: dict[str, float | None] = {f"p{q:g}": percentile(latencies_s, q) * 1000.0 for q in PERCENTILES}
    summary["mean"] = sum(latencies_s) / len(latencies_s) * 1000.0
    summary["max"] = max(latencies_s) * 1000.0
    return summary


def accuracy(records: Iterable[RequestRecord]) -> tuple[float | None, int, int]:
    """(accuracy, num_correct, num_scored) over answered requests whose input has a known label."""
    num_correct = num_scored = 0
    for record in records:
        if not record.ok:
            continue
        if record.num_correct is not None:  # a request of several inputs
            num_scored += record.num_labelled
            num_correct += record.num_correct
        elif record.expected_label is not None and record.predicted_label is not None:
            num_scored += 1
            num_correct += record.predicted_label == record.expected_label
    return (num_correct / num_scored if num_scored else None), num_correct, num_scored


def exit_layer_histogram(records: Iterable[RequestRecord]) -> dict[str, int]:
    """Answered inputs per exit layer (1-based), keys as strings in layer order (JSON-friendly)."""
    counts: Counter[int] = Counter()
    for r in records:
        if r.ok and r.exit_layers:
            counts.update(r.exit_layers)
        elif r.ok and r.exit_layer is not None:
            counts[r.exit_layer] += 1
    return {str(layer): counts[layer] for layer in sorted(counts)}


def summarize(records: Sequence[RequestRecord], duration_s: float) -> dict[str, Any]:
    """Everything a run report holds about its requests."""
    answered = [r for r in records if r.ok]
    acc, num_correct, num_scored = accuracy(records)
    histogram = exit_layer_histogram(records)
    num_with_layer = sum(histogram.values())
    lags_s = [r.sent_s - r.scheduled_s for r in records]
    return {
        "num_requests": len(records),
        "num_ok": len(answered),
        "num_errors": len(records) - len(answered),
        "duration_s": duration_s,
        "throughput_rps": len(answered) / duration_s if duration_s > 0 else 0.0,
        "rows_per_s": sum(r.num_inputs for r in answered) / duration_s if duration_s > 0 else 0.0,
        "latency_ms": latency_summary_ms([r.latency_s for r in answered]),
        "status_counts": dict(sorted(Counter(r.status for r in records).items())),
        "errors_by_status": dict(sorted(Counter(r.status for r in records if not r.ok).items())),
        "accuracy": acc,
        "num_correct": num_correct,
        "num_scored": num_scored,
        "exit_layer_histogram": histogram,
        "mean_exit_layer": (
            sum(int(k) * n for k, n in histogram.items()) / num_with_layer if num_with_layer else None
        ),
        "client_lag_ms": {
            "p50": percentile(lags_s, 50) * 1000.0 if lags_s else None,
            "max": max(lags_s) * 1000.0 if lags_s else None,
        },
    }


def summarize_by_speed(records: Sequence[RequestRecord], duration_s: float) -> dict[str, dict[str, Any]]:
    """``summarize`` per speed value of a mixed run (throughput of each share over the whole run)."""
    speeds = sorted({r.speed for r in records}, key=lambda s: -1.0 if s is None else s)
    return {
        ("default" if speed is None else f"{speed:g}"): summarize(
            [r for r in records if r.speed == speed], duration_s
        )
        for speed in speeds
    }
