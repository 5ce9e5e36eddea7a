"""Live accuracy guard and auto-adjust, with scripted runs (no model)."""

from __future__ import annotations

import pytest

from server.engine.guard import AccuracyGuard, AutoAdjuster, speed_bucket
from server.engine.scheduler import RowSpec, Scheduler
from tests.server.engine.fakes import FakeRunner, add_request, make_scheduler, step


def test_samples_exactly_the_configured_fraction_of_early_exits() -> None:
    guard = AccuracyGuard(sample_fraction=0.01)
    sampled = [guard.should_sample(exit_layer=2, num_layers=6) for _ in range(1000)]
    assert sum(sampled) == 10
    assert sampled.index(True) == 99  # every 100th, deterministic
    assert not any(guard.should_sample(exit_layer=6, num_layers=6) for _ in range(1000))  # full depth
    quarter = AccuracyGuard(0.25)
    assert sum(quarter.should_sample(1, 6) for _ in range(40)) == 10
    with pytest.raises(ValueError):
        AccuracyGuard(1.5)


def test_agreement_exact_on_known_script() -> None:
    guard = AccuracyGuard(0.01, expected_agreement={"0.3": 0.99})
    script = [(0.35, 1, 1), (0.31, 0, 1), (0.3, 1, 1), (0.3, 1, 1), (0.72, 0, 0), (0.79, 1, 0)]
    for speed, early, full in script:
        guard.record(speed, early, full)
    curve = guard.live_curve()
    assert curve["0.3"] == {
        "num_samples": 4,
        "agreement": 0.75,
        "recent_agreement": 0.75,
        "expected_agreement": 0.99,
    }
    assert curve["0.7"]["agreement"] == 0.5 and curve["0.7"]["expected_agreement"] is None
    assert [speed_bucket(s) for s in (0.0, 0.09, 0.1, 0.55, 0.99, 1.0)] == [
        "0.0",
        "0.0",
        "0.1",
        "0.5",
        "0.9",
        "1.0",
    ]


def _shadow_row(row_id: int) -> RowSpec:
    return RowSpec(row_id, 0, (1, 2, 3), criterion_code=0, threshold=0.0, max_layers=6, shadow=True)


def _saturated_run(with_shadow: bool) -> tuple[dict[int, int], list[tuple[int, int]], Scheduler, FakeRunner]:
    """Real requests arrive faster than they are served (the queue only grows); shadow rows keep coming."""
    scheduler = make_scheduler(max_batch_size=4, max_shadow_rows=16)
    runner = FakeRunner({0: 6})
    finished_at: dict[int, int] = {}
    shadow_id = 10**6
    for step_index in range(40):
        request_id, _ = add_request(scheduler, 3)
        runner.exit_layer_by_request[request_id] = 1 + request_id % 4
        if with_shadow:
            for _ in range(3):
                shadow_id += 1
                scheduler.add_shadow_row(_shadow_row(shadow_id))
        for row, _ in step(scheduler, runner):
            assert not row.shadow
            finished_at[row.row_id] = step_index
    real_plans = [(p.layer, p.num_rows) for p in runner.plans if not p.shadow]
    return finished_at, real_plans, scheduler, runner


def test_shadow_work_never_delays_foreground_under_saturated_queue() -> None:
    without, plans_without, _, _ = _saturated_run(with_shadow=False)
    with_shadow, plans_with, scheduler, runner = _saturated_run(with_shadow=True)
    assert with_shadow == without  # every real row finished at the same step
    assert plans_with == plans_without  # the very same real steps, in the same order
    assert not any(p.shadow for p in runner.plans)  # no spare capacity, no shadow step
    # Every shadow row was shed (queue full) or refused (cap) or still waits; none ran.
    assert scheduler.num_shadow_dropped + scheduler.num_shadow_rows == 120
    assert scheduler.num_waiting >= scheduler.config.max_batch_size  # the queue was saturated
    shed = scheduler.take_dropped_shadow_rows()  # handed back once, so their owner can forget them
    assert shed and len(set(shed)) == len(shed) <= scheduler.num_shadow_dropped
    assert scheduler.take_dropped_shadow_rows() == []


def test_shadow_rows_wait_below_a_full_queue_and_are_shed_at_a_full_one() -> None:
    scheduler = make_scheduler(max_batch_size=4)
    runner = FakeRunner({0: 6})
    a, _ = add_request(scheduler, 4)
    runner.exit_layer_by_request[a] = 6
    step(scheduler, runner)  # a's 4 rows are in flight (the in-flight cap is one batch)
    scheduler.add_shadow_row(_shadow_row(1000))
    add_request(scheduler, 2)  # 2 real rows wait: less than a batch
    step(scheduler, runner)
    assert scheduler.num_shadow_rows == 1 and scheduler.num_shadow_dropped == 0  # kept for later
    add_request(scheduler, 2)  # now a full batch of real rows waits: shed the shadow row
    step(scheduler, runner)
    assert scheduler.num_shadow_rows == 0 and scheduler.take_dropped_shadow_rows() == [1000]


def test_shadow_runs_in_spare_capacity_and_never_shares_a_step() -> None:
    scheduler = make_scheduler(max_batch_size=8, max_shadow_batch_size=2)
    runner = FakeRunner({0: 6})
    for row_id in range(1000, 1003):
        scheduler.add_shadow_row(_shadow_row(row_id))
    shadow_finished = []
    while scheduler.has_work():
        shadow_finished += [row.row_id for row, _ in step(scheduler, runner)]
    assert sorted(shadow_finished) == [1000, 1001, 1002]
    assert all(p.shadow and p.num_rows <= 2 for p in runner.plans)
    # A real request arriving while shadow rows are mid-flight runs next, alone.
    for row_id in range(2000, 2002):
        scheduler.add_shadow_row(_shadow_row(row_id))
    step(scheduler, runner)
    request_id, _ = add_request(scheduler, 1)
    runner.exit_layer_by_request[request_id] = 1
    step(scheduler, runner)
    assert not runner.plans[-1].shadow and runner.plans[-1].num_rows == 1


def _feed(adjuster: AutoAdjuster, agreement_at, num_samples: int) -> list[float]:
    """Feed samples at the adjuster's current speed; agreement_at(speed, i) says if sample i agrees."""
    speeds = []
    for i in range(num_samples):
        adjuster.observe(adjuster.speed, agreement_at(adjuster.speed, i))
        speeds.append(adjuster.speed)
    return speeds


def test_drift_lowers_speed_restores_agreement_then_relaxes() -> None:
    adjuster = AutoAdjuster(initial_speed=0.6, target_agreement=0.97, window=50, margin=0.01, step=0.1)
    guard = AccuracyGuard(1.0, expected_agreement={"0.6": 0.99})

    def healthy(speed: float, i: int) -> bool:
        return True

    def drifted(speed: float, i: int) -> bool:
        # After the drift, early answers at speed >= 0.45 disagree with full depth 1 time in 5.
        return speed < 0.45 or i % 5 != 0

    assert set(_feed(adjuster, healthy, 200)) == {0.6}  # healthy: nothing moves

    # Drift: the alert condition (live agreement clearly below calibration) is met at the default speed.
    for i in range(50):
        guard.record(0.6, early_label=int(drifted(0.6, i)), full_label=1)
    live = guard.live_curve()["0.6"]
    assert live["recent_agreement"] is not None and live["expected_agreement"] is not None
    assert live["recent_agreement"] < live["expected_agreement"] - 0.05

    speeds = _feed(adjuster, drifted, 400)
    assert speeds[-1] == pytest.approx(0.4)
    first_ok = speeds.index(0.4)
    assert first_ok <= 2 * 50, "agreement restored within two windows of the drift"
    # While the drift lasts, probes up are rare and back off: most samples run at the safe speed.
    assert sum(s == pytest.approx(0.4) for s in speeds[first_ok:]) >= 0.8 * len(speeds[first_ok:])
    assert adjuster.raise_after_windows > adjuster.base_raise_after_windows

    # The drift ends: the default relaxes back to the calibrated speed, and never above it.
    speeds = _feed(adjuster, healthy, 5000)
    assert speeds[-1] == pytest.approx(0.6)
    assert max(speeds) == pytest.approx(0.6)
    assert all(c.new_speed >= 0.0 for c in adjuster.changes)


def test_requests_with_their_own_speed_are_ignored() -> None:
    adjuster = AutoAdjuster(initial_speed=0.6, target_agreement=0.97, window=10)
    for _ in range(100):
        assert adjuster.observe(0.9, False) is None
    assert adjuster.speed == 0.6
