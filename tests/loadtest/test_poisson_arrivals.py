"""The open loop's Poisson arrivals, with a seeded RNG."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from loadtest.arrivals import poisson_arrival_times_s


def test_same_seed_same_arrivals_and_times_increase() -> None:
    first = poisson_arrival_times_s(100.0, 500, random.Random(7))
    assert first == poisson_arrival_times_s(100.0, 500, random.Random(7))
    assert first != poisson_arrival_times_s(100.0, 500, random.Random(8))
    assert all(b > a for a, b in itertools.pairwise(first))
    assert first[0] > 0.0


def test_gaps_are_exponential_with_mean_one_over_rate() -> None:
    rate_per_s, num = 250.0, 40_000
    times_s = poisson_arrival_times_s(rate_per_s, num, random.Random(1))
    gaps_s = [b - a for a, b in zip([0.0, *times_s], times_s, strict=False)]
    mean_s = sum(gaps_s) / num
    std_s = math.sqrt(sum((g - mean_s) ** 2 for g in gaps_s) / (num - 1))
    # standard error of the mean is (1/rate)/sqrt(n) = 0.5 %: 3 % is > 5 standard errors
    assert mean_s == pytest.approx(1 / rate_per_s, rel=0.03)
    assert std_s / mean_s == pytest.approx(1.0, abs=0.03)  # exponential: coefficient of variation 1
    # P(gap > mean) = e^-1 for an exponential distribution
    above = sum(g > 1 / rate_per_s for g in gaps_s) / num
    assert above == pytest.approx(math.exp(-1), abs=0.015)


def test_counts_per_window_are_poisson() -> None:
    rate_per_s = 50.0
    times_s = poisson_arrival_times_s(rate_per_s, 50_000, random.Random(2))
    num_windows = int(times_s[-1])  # whole 1-second windows
    counts = [0] * num_windows
    for t in times_s:
        if t < num_windows:
            counts[int(t)] += 1
    mean = sum(counts) / num_windows
    variance = sum((c - mean) ** 2 for c in counts) / (num_windows - 1)
    assert mean == pytest.approx(rate_per_s, rel=0.03)
    assert variance / mean == pytest.approx(1.0, abs=0.15)  # Poisson: variance = mean (a regular clock: 0)


def test_invalid_rate_refused() -> None:
    with pytest.raises(ValueError):
        poisson_arrival_times_s(0.0, 10, random.Random(0))
    assert poisson_arrival_times_s(5.0, 0, random.Random(0)) == []
