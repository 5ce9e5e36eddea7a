"""Accuracy targets -> (criterion, speed) through a known calibration table."""

from __future__ import annotations

import pytest

from model_store.manifest import CalibrationPoint, CalibrationTable
from model_store.policy import Criterion
from server.engine.errors import InvalidRequestError
from server.engine.targets import for_accuracy_drop, for_mean_exit_layer

NE, MP = Criterion.NORMALIZED_ENTROPY, Criterion.MAX_PROB


def _point(criterion: Criterion, speed: float, accuracy: float, mean_exit_layer: float) -> CalibrationPoint:
    return CalibrationPoint(
        criterion=criterion,
        speed=speed,
        accuracy=accuracy,
        mean_exit_layer=mean_exit_layer,
        layers_saved=1 - mean_exit_layer / 6,
        expected_speedup=6 / mean_exit_layer,
    )


TABLE = CalibrationTable(
    split="dev",
    num_examples=1000,
    full_depth_accuracy=0.980,
    points=[
        _point(NE, 0.0, 0.980, 6.0),
        _point(NE, 0.2, 0.979, 2.5),
        _point(NE, 0.4, 0.976, 1.8),
        _point(NE, 0.6, 0.960, 1.2),
        _point(MP, 0.4, 0.977, 2.0),
        _point(MP, 0.8, 0.950, 1.1),
    ],
)


def test_fastest_setting_within_the_drop() -> None:
    chosen = for_accuracy_drop(TABLE, 0.5)
    assert (chosen.criterion, chosen.speed) == (NE, 0.4)
    assert chosen.calibrated_drop_pts == pytest.approx(0.4)
    assert chosen.calibrated_mean_exit_layer == 1.8
    tight = for_accuracy_drop(TABLE, 0.35)
    assert (tight.criterion, tight.speed) == (MP, 0.4)
    assert for_accuracy_drop(TABLE, 0.0).speed == 0.0
    loose = for_accuracy_drop(TABLE, 5.0)
    assert (loose.criterion, loose.speed) == (MP, 0.8)
    only_ne = for_accuracy_drop(TABLE, 0.35, criterion=NE)
    assert (only_ne.criterion, only_ne.speed) == (NE, 0.2)


def test_never_exceeds_the_target() -> None:
    for target in [0.0, 0.05, 0.1, 0.3, 0.5, 1.0, 2.0, 3.0, 10.0]:
        chosen = for_accuracy_drop(TABLE, target)
        assert chosen.calibrated_drop_pts <= target + 1e-9


def test_mean_exit_layer_target() -> None:
    chosen = for_mean_exit_layer(TABLE, 2.0)
    assert (chosen.criterion, chosen.speed) == (MP, 0.4)
    assert for_mean_exit_layer(TABLE, 6).speed == 0.0


def test_unreachable_targets_name_the_best_reachable_value() -> None:
    without_full_depth = TABLE.model_copy(update={"points": TABLE.points[1:]})
    with pytest.raises(InvalidRequestError, match=r"smallest calibrated drop is 0\.10 points") as e:
        for_accuracy_drop(without_full_depth, 0.05)
    assert e.value.field == "max_accuracy_drop"
    assert "speed 0.2" in e.value.public_message
    with pytest.raises(InvalidRequestError, match=">= 0"):
        for_accuracy_drop(TABLE, -1.0)
    with pytest.raises(InvalidRequestError, match=r"lowest calibrated mean exit layer is 1\.10"):
        for_mean_exit_layer(TABLE, 1.05)
    with pytest.raises(InvalidRequestError, match=">= 0"):
        for_accuracy_drop(TABLE, float("nan"))
    with pytest.raises(InvalidRequestError, match="no calibration table"):
        for_accuracy_drop(None, 0.5)


def test_targets_use_the_upper_bound_when_calibration_has_it() -> None:
    # The NE 0.4 point looks 0.4 pt below full depth, but its upper bound is 0.9 pt: a 0.5 target skips it.
    points = [
        p.model_copy(update={"accuracy_drop_upper": 0.009}) if p.speed == 0.4 and p.criterion == NE else p
        for p in TABLE.points
    ]
    table = TABLE.model_copy(update={"points": points})
    chosen = for_accuracy_drop(table, 0.5)
    assert (chosen.criterion, chosen.speed) == (MP, 0.4)
    assert for_accuracy_drop(table, 1.0).speed == 0.4 and for_accuracy_drop(table, 1.0).criterion == NE
