"""Per-request accuracy targets, turned into a (criterion, speed) through the calibration table.

Conservative by construction: only calibrated points are ever chosen, and never one whose calibrated
accuracy drop exceeds the target. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass

from model_store.manifest import CalibrationPoint, CalibrationTable, conservative_drop
from model_store.policy import CRITERION_CODES, Criterion, threshold_for
from server.engine.admission import DegradeLevel
from server.engine.errors import InvalidRequestError

_EPS = 1e-9


@dataclass(frozen=True)
class ResolvedTarget:
    """The setting chosen for a target, with what calibration promises for it."""

    criterion: Criterion
    speed: float
    calibrated_accuracy: float
    calibrated_drop_pts: float
    calibrated_mean_exit_layer: float


def drop_pts(table: CalibrationTable, point: CalibrationPoint) -> float:
    """Accuracy drop of ``point`` below full depth in percentage points: the 95 % upper bound where the
    table has one (a dev split of ~600 rows is noisy), else the measured drop."""
    return conservative_drop(table, point) * 100.0


def _candidates(table: CalibrationTable | None, criterion: Criterion | None) -> list[CalibrationPoint]:
    if table is None or not table.points:
        raise InvalidRequestError(
            "this model has no calibration table, so accuracy targets are unavailable; set speed instead",
            field="max_accuracy_drop",
        )
    points = [p for p in table.points if criterion is None or p.criterion == criterion]
    if not points:
        raise InvalidRequestError(f"no calibration for criterion {criterion}", field="criterion")
    return points


def _resolved(table: CalibrationTable, point: CalibrationPoint) -> ResolvedTarget:
    return ResolvedTarget(
        point.criterion, point.speed, point.accuracy, drop_pts(table, point), point.mean_exit_layer
    )


def for_accuracy_drop(
    table: CalibrationTable | None, max_drop_pts: float, criterion: Criterion | None = None
) -> ResolvedTarget:
    """The fastest calibrated setting whose accuracy drop is at most ``max_drop_pts`` points."""
    if not max_drop_pts >= 0.0:  # also refuses NaN
        raise InvalidRequestError("max_accuracy_drop must be a number >= 0", field="max_accuracy_drop")
    points = _candidates(table, criterion)
    assert table is not None
    within = [p for p in points if drop_pts(table, p) <= max_drop_pts + _EPS]
    if not within:
        best = min(points, key=lambda p: (drop_pts(table, p), p.mean_exit_layer))
        raise InvalidRequestError(
            f"max_accuracy_drop {max_drop_pts} is unreachable: the smallest calibrated drop is "
            f"{drop_pts(table, best):.2f} points (criterion {best.criterion}, speed {best.speed})",
            field="max_accuracy_drop",
        )
    chosen = min(within, key=lambda p: (p.mean_exit_layer, drop_pts(table, p), p.speed))
    return _resolved(table, chosen)


def for_mean_exit_layer(
    table: CalibrationTable | None, max_mean_exit_layer: float, criterion: Criterion | None = None
) -> ResolvedTarget:
    """The most accurate calibrated setting whose mean exit layer is at most ``max_mean_exit_layer``."""
    if not max_mean_exit_layer >= 1.0:
        raise InvalidRequestError("max_mean_exit_layer must be a number >= 1", field="max_mean_exit_layer")
    points = _candidates(table, criterion)
    assert table is not None
    within = [p for p in points if p.mean_exit_layer <= max_mean_exit_layer + _EPS]
    if not within:
        best = min(points, key=lambda p: (p.mean_exit_layer, -p.accuracy))
        raise InvalidRequestError(
            f"max_mean_exit_layer {max_mean_exit_layer} is unreachable: the lowest calibrated mean exit "
            f"layer is {best.mean_exit_layer:.2f} (criterion {best.criterion}, speed {best.speed})",
            field="max_mean_exit_layer",
        )
    chosen = max(within, key=lambda p: (p.accuracy, -p.mean_exit_layer, -p.speed))
    return _resolved(table, chosen)


MAX_DEGRADE_LEVELS = 8  # faster settings tried at admission under overload (each costs one prediction)


@dataclass(frozen=True)
class DegradePlan:
    """A request's own setting as calibrated, and the faster ones it allows under overload."""

    drop_pts: float  # calibrated drop of the request's own setting
    levels: tuple[DegradeLevel, ...]  # least degraded first


def degrade_plan(
    table: CalibrationTable | None,
    criterion: Criterion,
    speed: float,
    max_drop_pts: float,
    num_labels: int,
    num_layers: int,
) -> DegradePlan:
    """The calibrated settings faster than (criterion, speed) whose accuracy drop against full depth is
    at most ``max_drop_pts`` (95 % upper bound), on the speed-accuracy frontier, least degraded first and
    thinned to ``MAX_DEGRADE_LEVELS`` (the fastest always kept). Cached per table and arguments."""
    if table is None or not table.points:
        raise InvalidRequestError(
            "this model has no calibration table, so it cannot degrade within an accuracy budget",
            field="overload_max_accuracy_drop",
        )
    key = (id(table), criterion, speed, max_drop_pts, num_labels, num_layers)
    cached = _PLANS.get(key)
    if cached is not None and cached[0] is table:
        return cached[1]
    own = [p for p in table.points if p.criterion == criterion]
    point = min(own, key=lambda p: abs(p.speed - speed)) if own else None
    own_mean = float(num_layers) if point is None or speed <= 0.0 else point.mean_exit_layer
    own_drop = 0.0 if point is None or speed <= 0.0 else max(0.0, drop_pts(table, point))
    candidates = sorted(
        (
            p
            for p in table.points
            if drop_pts(table, p) <= max_drop_pts + _EPS and p.mean_exit_layer < own_mean - 0.01
        ),
        key=lambda p: (-p.mean_exit_layer, drop_pts(table, p)),
    )
    frontier: list[CalibrationPoint] = []  # each faster than the last and no less accurate than later
    for p in candidates:
        while frontier and drop_pts(table, frontier[-1]) >= drop_pts(table, p):
            frontier.pop()  # p is at least as accurate and faster
        frontier.append(p)
    if len(frontier) > MAX_DEGRADE_LEVELS:
        step = (len(frontier) - 1) / (MAX_DEGRADE_LEVELS - 1)
        frontier = [frontier[round(i * step)] for i in range(MAX_DEGRADE_LEVELS)]
    plan = DegradePlan(
        drop_pts=own_drop,
        levels=tuple(
            DegradeLevel(
                criterion_code=CRITERION_CODES[p.criterion],
                threshold=threshold_for(p.criterion, p.speed, num_labels, num_layers),
                speed=p.speed,
                drop_pts=max(0.0, drop_pts(table, p)),
                mean_exit_layer=p.mean_exit_layer,
            )
            for p in frontier
        ),
    )
    if len(_PLANS) >= 256:
        _PLANS.clear()
    _PLANS[key] = (table, plan)
    return plan


_PLANS: dict[tuple[object, ...], tuple[CalibrationTable, DegradePlan]] = {}
