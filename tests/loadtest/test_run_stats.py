"""Percentile maths on known latencies, accuracy counting, exit-layer histograms."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from loadtest.stats import (
    RequestRecord,
    accuracy,
    exit_layer_histogram,
    latency_summary_ms,
    percentile,
    summarize,
)


def test_percentiles_of_0_to_100_are_the_ranks() -> None:
    values = [float(v) for v in range(101)]
    random.Random(3).shuffle(values)  # order of the input must not matter
    assert percentile(values, 50) == 50.0
    assert percentile(values, 90) == 90.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 0) == 0.0
    assert percentile(values, 100) == 100.0


def test_percentiles_interpolate_between_ranks() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert percentile(values, 50) == 5.5
    assert percentile(values, 90) == pytest.approx(9.1, abs=1e-12)
    assert percentile(values, 99) == pytest.approx(9.91, abs=1e-12)
    assert percentile([10.0, 20.0, 30.0, 40.0], 50) == 25.0
    assert percentile([10.0, 20.0, 30.0, 40.0], 75) == 32.5
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_percentile_matches_numpy_linear_on_random_sets() -> None:
    rng = random.Random(11)
    for size in (2, 3, 17, 1000):
        values = [rng.lognormvariate(0, 1) for _ in range(size)]
        for q in (1, 50, 90, 99, 99.9):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_latency_summary_is_in_milliseconds() -> None:
    summary = latency_summary_ms([i / 1000 for i in range(101)])  # 0..100 ms
    assert summary["p50"] == pytest.approx(50.0, abs=1e-9)
    assert summary["p90"] == pytest.approx(90.0, abs=1e-9)
    assert summary["p99"] == pytest.approx(99.0, abs=1e-9)
    assert summary["mean"] == pytest.approx(50.0, abs=1e-9)
    assert summary["max"] == pytest.approx(100.0, abs=1e-9)
    assert latency_summary_ms([])["p99"] is None


def _record(index: int, status: str, expected: str | None, predicted: str | None, layer: int | None):
    return RequestRecord(
        index=index,
        example_index=index,
        speed=None,
        scheduled_s=0.0,
        sent_s=0.0,
        latency_s=0.01 * (index + 1),
        status=status,
        expected_label=expected,
        predicted_label=predicted,
        exit_layer=layer,
    )


RECORDS = [
    _record(0, "200", "spam", "spam", 1),
    _record(1, "200", "spam", "ham", 2),
    _record(2, "200", "ham", "ham", 2),
    _record(3, "200", None, "ham", 3),  # unlabelled input: not scored
    _record(4, "503", "ham", None, None),  # error: not scored, not in the histogram
    _record(5, "transport:ConnectError", "spam", None, None),
]


def test_accuracy_counts_only_answered_labelled_requests() -> None:
    acc, num_correct, num_scored = accuracy(RECORDS)
    assert (num_correct, num_scored) == (2, 3)
    assert acc == pytest.approx(2 / 3)
    assert accuracy([])[0] is None


def test_exit_layer_histogram_and_summary() -> None:
    assert exit_layer_histogram(RECORDS) == {"1": 1, "2": 2, "3": 1}
    summary = summarize(RECORDS, duration_s=2.0)
    assert summary["num_requests"] == 6
    assert summary["num_ok"] == 4
    assert summary["throughput_rps"] == 2.0
    assert summary["errors_by_status"] == {"503": 1, "transport:ConnectError": 1}
    assert summary["status_counts"] == {"200": 4, "503": 1, "transport:ConnectError": 1}
    assert summary["mean_exit_layer"] == 2.0
    # latencies of the answered requests: 10, 20, 30, 40 ms
    assert summary["latency_ms"]["p50"] == pytest.approx(25.0)
    assert summary["latency_ms"]["max"] == pytest.approx(40.0)
