"""Arrival processes: when each request of a run is due to be sent."""

from __future__ import annotations

import random


def poisson_arrival_times_s(rate_per_s: float, num_requests: int, rng: random.Random) -> list[float]:
    """Send times (seconds from the start) of a Poisson process: exponential gaps of mean 1/rate.

    The first request is due after one gap, not at 0, so every gap follows the same distribution.
    """
    if rate_per_s <= 0:
        raise ValueError(f"rate must be positive, got {rate_per_s}")
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    times_s: list[float] = []
    now_s = 0.0
    for _ in range(num_requests):
        now_s += rng.expovariate(rate_per_s)
        times_s.append(now_s)
    return times_s
