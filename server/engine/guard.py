"""Live accuracy guard and auto-adjust. Pure Python (no torch): the worker feeds it, metrics read it.

A configurable fraction of the rows that exited early is also run to full depth as *shadow* work, in
spare capacity only (see the scheduler). The guard compares each sampled early answer with the full-depth
answer, per speed bucket, next to the agreement calibration measured for that bucket. Thresholds tuned
offline drift when the input distribution does (the Apparate paper saw up to 17.8 points lost on NLP
workloads); this is how a running server notices.

The auto-adjuster lowers the model's *default* speed while live agreement is below its target and raises
it again once agreement recovers, with hysteresis and bounds. Requests that set their own speed are never
touched: only the default moves.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


def speed_bucket(speed: float) -> str:
    """Low-cardinality label for a speed: rounded down to a multiple of 0.1 ("0.0" .. "1.0")."""
    return f"{math.floor(speed * 10 + 1e-9) / 10:.1f}"


@dataclass
class BucketStats:
    """Live agreement of sampled early exits with full depth, for one speed bucket."""

    num_samples: int = 0
    num_agreements: int = 0
    recent: deque[bool] = field(default_factory=lambda: deque(maxlen=200))

    @property
    def agreement(self) -> float | None:
        return self.num_agreements / self.num_samples if self.num_samples else None


class AccuracyGuard:
    """Decides which early exits to shadow and keeps the agreement tallies."""

    def __init__(self, sample_fraction: float, expected_agreement: dict[str, float] | None = None) -> None:
        if not 0.0 <= sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be within [0, 1], got {sample_fraction}")
        self.sample_fraction = sample_fraction
        self.expected_agreement = dict(expected_agreement or {})
        self.buckets: dict[str, BucketStats] = {}
        self._credit = 0.0  # deterministic sampling: exactly one row per 1/fraction early exits
        self.num_dropped = 0  # samples not taken because the shadow queue was full

    def should_sample(self, exit_layer: int, num_layers: int) -> bool:
        """Whether this answered row should also run to full depth (early exits only)."""
        if exit_layer >= num_layers or self.sample_fraction <= 0.0:
            return False
        self._credit += self.sample_fraction
        if self._credit >= 1.0 - 1e-9:
            self._credit -= 1.0
            return True
        return False

    def record(self, speed: float, early_label: int, full_label: int) -> str:
        """Tally one shadow result; returns its bucket."""
        bucket = speed_bucket(speed)
        stats = self.buckets.setdefault(bucket, BucketStats())
        agreed = early_label == full_label
        stats.num_samples += 1
        stats.num_agreements += int(agreed)
        stats.recent.append(agreed)
        return bucket

    def live_curve(self) -> dict[str, dict[str, float | int | None]]:
        """Per bucket: samples, live agreement, recent agreement, calibrated expectation."""
        return {
            bucket: {
                "num_samples": stats.num_samples,
                "agreement": stats.agreement,
                "recent_agreement": sum(stats.recent) / len(stats.recent) if stats.recent else None,
                "expected_agreement": self.expected_agreement.get(bucket),
            }
            for bucket, stats in sorted(self.buckets.items())
        }


@dataclass(frozen=True)
class SpeedChange:
    """One move of the default speed, for the log, the metrics and ``GET /v1/models``."""

    old_speed: float
    new_speed: float
    agreement: float
    reason: str


class AutoAdjuster:
    """Moves the default speed by ``step`` to keep windowed agreement near ``target_agreement``.

    * Lower the speed (not below ``min_speed``) when agreement over the last ``window`` samples taken at
      the current default is below ``target - margin``.
    * Raise it (never above ``max_speed``, the calibrated default) after ``raise_after_windows``
      consecutive windows above ``target + margin``. A raise is a probe: if the very next window is bad
      again (the drift is still there), the number of good windows needed before the next probe
      doubles, up to ``max_raise_after_windows``; a raise that holds resets it.

    Each change restarts the window, so every decision rests on samples taken at the speed it judges.
    """

    def __init__(
        self,
        initial_speed: float,
        target_agreement: float,
        window: int = 50,
        margin: float = 0.01,
        step: float = 0.1,
        min_speed: float = 0.0,
        raise_after_windows: int = 2,
        max_raise_after_windows: int = 64,
    ) -> None:
        self.speed = initial_speed
        self.max_speed = initial_speed
        self.min_speed = min_speed
        self.target_agreement = target_agreement
        self.window = window
        self.margin = margin
        self.step = step
        self.base_raise_after_windows = raise_after_windows
        self.raise_after_windows = raise_after_windows
        self.max_raise_after_windows = max_raise_after_windows
        self._recent: list[bool] = []
        self._good_windows = 0
        self._probing = False  # the last change was a raise not yet confirmed by a full window
        self.changes: list[SpeedChange] = []

    def observe(self, speed: float, agreed: bool) -> SpeedChange | None:
        """Feed one shadow result taken at ``speed``; returns a change when the default moved."""
        if abs(speed - self.speed) > 1e-9:
            return None  # a request with its own speed, or a sample from before the last change
        self._recent.append(agreed)
        if len(self._recent) < self.window:
            return None
        agreement = sum(self._recent) / len(self._recent)
        self._recent.clear()
        if agreement < self.target_agreement - self.margin:
            self._good_windows = 0
            if self._probing:
                self.raise_after_windows = min(self.max_raise_after_windows, 2 * self.raise_after_windows)
            self._probing = False
            if self.speed > self.min_speed:
                return self._move(max(self.min_speed, self.speed - self.step), agreement, "below target")
            return None
        if self._probing:
            self._probing = False
            self.raise_after_windows = self.base_raise_after_windows
        if agreement > self.target_agreement + self.margin and self.speed < self.max_speed:
            self._good_windows += 1
            if self._good_windows >= self.raise_after_windows:
                self._good_windows = 0
                self._probing = True
                return self._move(min(self.max_speed, self.speed + self.step), agreement, "recovered")
        return None

    def _move(self, new_speed: float, agreement: float, reason: str) -> SpeedChange:
        new_speed = round(new_speed, 6)
        change = SpeedChange(self.speed, new_speed, agreement, f"live agreement {reason}")
        logger.warning(
            "auto-adjust: default speed %.2f -> %.2f (live agreement %.3f, target %.3f)",
            self.speed, new_speed, agreement, self.target_agreement,
        )  # fmt: skip
        self.speed = new_speed
        self.changes.append(change)
        return change
