"""Reading a bench output: sweeps by speed, targets, and the numbers the report and plots share."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

SPEED_RUN_RE = re.compile(r"^(refill|shrink)-speed-([0-9.]+)$")
ACCURACY_TOLERANCE = 0.005
TARGET_SPEEDUP_OVER_FULL_DEPTH = 3.0
TARGET_SPEEDUP_OVER_PIPELINE = 5.0
TARGET_TINY_RPS = 3000.0


def results(doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = doc["results"]
    return out


def rps(doc: dict[str, Any]) -> float:
    return float(results(doc)["throughput_rps"])


def sweep(runs: dict[str, dict[str, Any]], target: str) -> list[tuple[float, dict[str, Any]]]:
    """(speed, run) of the closed-loop speed sweep of ``target`` (refill | shrink), by speed."""
    points = []
    for name, doc in runs.items():
        match = SPEED_RUN_RE.match(name)
        if match and match.group(1) == target:
            points.append((float(match.group(2)), doc))
    return sorted(points, key=lambda p: p[0])


@dataclass(frozen=True)
class Target:
    """One target of the issue: what was asked, what was measured, met or by how much missed."""

    name: str
    wanted: float
    measured: float | None
    unit: str

    @property
    def met(self) -> bool:
        return self.measured is not None and self.measured >= self.wanted

    def verdict(self) -> str:
        if self.measured is None:
            return "not measured"
        if self.met:
            return "met"
        shortfall = self.wanted - self.measured
        return f"missed by {shortfall:.3g} {self.unit} ({self.measured / self.wanted:.0%} of target)"


def targets(index: dict[str, Any], runs: dict[str, dict[str, Any]]) -> list[Target]:
    chosen = float(index["chosen_speed"])
    full = runs.get("refill-speed-0")
    fast = runs.get(f"refill-speed-{chosen:g}")
    pipeline = runs.get("pipeline")
    tiny = runs.get("tiny-1layer")
    out = []
    if full and fast:
        out.append(
            Target(
                f"refill speed {chosen:g} vs full depth (speed 0)",
                TARGET_SPEEDUP_OVER_FULL_DEPTH,
                rps(fast) / rps(full),
                "x",
            )
        )
    if pipeline and fast:
        out.append(
            Target(
                f"refill speed {chosen:g} vs pipeline baseline",
                TARGET_SPEEDUP_OVER_PIPELINE,
                rps(fast) / rps(pipeline) if rps(pipeline) > 0 else None,
                "x",
            )
        )
    if tiny:
        out.append(Target("1-layer tiny model, closed loop", TARGET_TINY_RPS, rps(tiny), "req/s"))
    return out


def accuracy_gap_pt(runs: dict[str, dict[str, Any]], speed: float) -> float | None:
    full = results(runs["refill-speed-0"])["accuracy"]
    fast = results(runs[f"refill-speed-{speed:g}"])["accuracy"]
    return None if full is None or fast is None else (fast - full) * 100.0
