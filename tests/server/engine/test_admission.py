"""Admission by time: the step-cost fit, the depth model, and the scheduler refusing, dropping and
admitting by predicted completion. A fake clock and hand-fed step timings; no torch."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from server.engine.admission import Backlog, DepthModel, ServiceModel, StepCostModel
from server.engine.errors import DeadlineExceededError, QueueFullError
from server.engine.scheduler import ADMISSION_MARGIN, Scheduler
from tests.server.engine.fakes import FakeRunner, add_request, make_scheduler, step

FIXED_S, PER_TOKEN_S = 0.002, 0.0001  # the engine these tests pretend to have timed


def _time_steps(scheduler: Scheduler, sizes: tuple[int, ...] = (8, 16, 32, 64)) -> None:
    """Feed the scheduler's service model steps of a known cost (fixed + per padded token)."""
    for num_tokens in sizes * 3:
        scheduler.service.observe_step(num_tokens, num_tokens, FIXED_S + PER_TOKEN_S * num_tokens)


def test_step_cost_fit_recovers_fixed_and_per_token_cost() -> None:
    model = StepCostModel()
    assert not model.ready
    for x in (10, 50, 100, 400, 10, 50, 100, 400):
        model.observe(x, 0.003 + 2e-5 * x)
    fixed_s, per_token_s = model.coefficients()
    assert model.ready
    assert fixed_s == pytest.approx(0.003, rel=1e-6)
    assert per_token_s == pytest.approx(2e-5, rel=1e-6)
    assert model.step_s(1000) == pytest.approx(0.023, rel=1e-6)


def test_steps_of_one_size_fit_a_line_through_the_origin() -> None:
    model = StepCostModel()
    for _ in range(5):
        model.observe(200, 0.01)
    assert model.coefficients() == pytest.approx((0.0, 0.01 / 200))


def test_depth_model_learns_per_policy_and_assumes_full_depth_otherwise() -> None:
    depth = DepthModel(alpha=0.5)
    assert depth.expected_layers(0, 0.5, 6) == 6.0  # never seen: full depth
    depth.observe(0, 0.5, 6, 1)
    depth.observe(0, 0.5, 6, 3)
    assert depth.expected_layers(0, 0.5, 6) == pytest.approx(2.0)
    assert depth.expected_layers(0, 0.0, 6) == 6.0  # another threshold is another policy


def test_drain_time_counts_steps_and_tokens() -> None:
    service = ServiceModel(max_rows_per_step=8, max_tokens_per_step=10_000)
    for x in (8, 32, 8, 32):
        service.observe_step(x, x, FIXED_S + PER_TOKEN_S * x)
    # 80 row-layers of 4 tokens, 8 rows per step: 10 steps of fixed cost + 320 token-layers.
    assert service.drain_s(Backlog(80, 320)) == pytest.approx(10 * FIXED_S + 320 * PER_TOKEN_S)
    # In cohorts of 4 rows: twice the steps.
    assert service.drain_s(Backlog(80, 320), rows_per_step=4) == pytest.approx(
        20 * FIXED_S + 320 * PER_TOKEN_S
    )
    # One row through 6 layers: 6 steps however few rows, not 6/8 of one.
    assert service.drain_s(Backlog.of_rows(1, 6, 4)) == pytest.approx(6 * FIXED_S + 24 * PER_TOKEN_S)


def test_cohorts_are_sized_to_leave_half_the_deadline_for_waiting() -> None:
    service = ServiceModel(max_rows_per_step=64, max_tokens_per_step=100_000)
    for x in (40, 400, 40, 400):
        service.observe_step(x, x, FIXED_S + PER_TOKEN_S * x)
    per_row_s = PER_TOKEN_S * 40  # rows of 40 tokens: 4 ms per row per step, plus 2 ms per step
    # A 1 s budget over 6 layers: steps of at most 0.5 / 6 s = 83 ms -> (83.3 - 2) / 4 = 20.3 rows.
    assert service.cohort_rows(1.0, 6, 40) == pytest.approx((0.5 / 6 - FIXED_S) / per_row_s)
    assert service.cohort_rows(100.0, 6, 40) == 64  # capped by the batch size
    assert service.cohort_rows(0.001, 6, 40) == 1.0


def test_untimed_engine_admits_by_count_only() -> None:
    scheduler = make_scheduler(max_queue_size=100)
    add_request(scheduler, 90, deadline_s=0.001)  # no step timed yet: nothing to predict with
    assert scheduler.num_waiting == 90
    with pytest.raises(QueueFullError) as refused:
        add_request(scheduler, 20)
    assert refused.value.reason == "queue_full"


def test_request_that_would_miss_its_deadline_is_refused_with_the_backlog_as_retry_after() -> None:
    scheduler = make_scheduler(max_batch_size=8, max_queue_size=1000)
    _time_steps(scheduler)
    add_request(scheduler, 80, num_tokens=4)  # 80 rows x 6 layers = 60 full steps ahead
    backlog_s = scheduler.predicted_backlog_s()
    assert backlog_s == pytest.approx(60 * (FIXED_S + PER_TOKEN_S * 32))
    own_s = 6 * (FIXED_S + PER_TOKEN_S * 32)  # a cohort of its own: 6 steps of 8 rows x 4 tokens
    answer_s = ADMISSION_MARGIN * (backlog_s + own_s)
    with pytest.raises(QueueFullError) as refused:
        add_request(scheduler, 1, num_tokens=4, deadline_s=answer_s - 0.001)
    assert refused.value.reason == "deadline"
    assert refused.value.retry_after_s == pytest.approx(ADMISSION_MARGIN * backlog_s)
    assert scheduler.num_waiting == 80  # all or nothing: the refused request left no row behind
    add_request(scheduler, 1, num_tokens=4, deadline_s=answer_s + 0.001)
    assert scheduler.num_waiting == 81


def test_request_without_deadline_is_refused_past_the_queue_wait_bound() -> None:
    scheduler = make_scheduler(max_batch_size=8, max_queue_size=1000, max_queue_wait_ms=100.0)
    _time_steps(scheduler)
    per_row_s = 6 * (FIXED_S + PER_TOKEN_S * 32) / 8  # six layers, an eighth of each full step
    for _ in range(int(0.1 / ADMISSION_MARGIN / per_row_s) + 1):  # each admitted: <= 100 ms ahead of it
        add_request(scheduler, 1, num_tokens=4)
    assert ADMISSION_MARGIN * scheduler.predicted_backlog_s() > 0.1
    with pytest.raises(QueueFullError) as refused:
        add_request(scheduler, 1, num_tokens=4)
    assert refused.value.reason == "queue_wait"
    assert refused.value.retry_after_s > 0.1


def test_too_much_work_for_the_deadline_even_when_idle_is_a_deadline_error() -> None:
    scheduler = make_scheduler(max_batch_size=8, max_queue_size=1000)
    _time_steps(scheduler)
    with pytest.raises(DeadlineExceededError):  # 64 rows x 6 layers = 48 full steps > 50 ms
        add_request(scheduler, 64, num_tokens=4, deadline_s=0.05)
    assert scheduler.num_waiting == 0


def test_learned_early_exits_make_room_for_more_requests() -> None:
    scheduler = make_scheduler(max_batch_size=8, max_queue_size=1000)
    _time_steps(scheduler)
    runner = FakeRunner({})
    for _ in range(30):  # requests of this policy leave after layer 1
        request_id, _ = add_request(scheduler, 8)
        runner.exit_layer_by_request[request_id] = 1
        step(scheduler, runner)
    add_request(scheduler, 80, num_tokens=4)
    # 80 rows x ~1 layer now, not x 6: a sixth of the full-depth backlog.
    assert scheduler.predicted_backlog_s() == pytest.approx(10 * (FIXED_S + PER_TOKEN_S * 32), rel=0.05)


def test_row_that_can_no_longer_finish_is_dropped_at_dispatch_without_compute() -> None:
    scheduler = make_scheduler(max_batch_size=8, max_queue_size=1000)
    _time_steps(scheduler)
    step_s = FIXED_S + PER_TOKEN_S * 4  # a lone row's step
    a, a_rows = add_request(scheduler, 1, num_tokens=4, deadline_s=1.0)
    b, b_rows = add_request(scheduler, 1, num_tokens=4)
    runner = FakeRunner({a: 6, b: 6})
    # At dispatch a's 6 layers no longer fit before its deadline (time passed while it waited).
    decision = scheduler.schedule(1.0 - 6 * step_s + 0.0001)
    assert [r.row_id for r in decision.expired] == a_rows
    assert decision.num_expired_in_flight == 0
    assert decision.plan is not None and decision.plan.row_ids == b_rows
    scheduler.update_from_output(decision.plan, runner.execute(decision.plan))
    assert scheduler.num_waiting == 0


def test_row_in_flight_is_dropped_once_one_more_step_cannot_finish() -> None:
    scheduler = make_scheduler(max_batch_size=8, max_queue_size=1000)
    _time_steps(scheduler)
    a, a_rows = add_request(scheduler, 1, num_tokens=4, deadline_s=1.0)
    runner = FakeRunner({a: 6})
    step(scheduler, runner, now_s=0.0)
    one_row_step_s = FIXED_S + PER_TOKEN_S * 1
    decision = scheduler.schedule(1.0 - one_row_step_s / 2)
    assert [r.row_id for r in decision.expired] == a_rows
    assert decision.num_expired_in_flight == 1
    assert decision.plan is not None and decision.plan.num_rows == 0  # only the drop is planned


def test_steps_feed_the_cost_model_with_their_measured_time() -> None:
    scheduler = make_scheduler(max_batch_size=8)
    a, _ = add_request(scheduler, 8, num_tokens=4)
    runner = FakeRunner({a: 6})
    for _ in range(4):
        decision = scheduler.schedule(0.0)
        assert decision.plan is not None
        scheduler.update_from_output(decision.plan, runner.execute(decision.plan), duration_s=0.01)
    assert scheduler.service.ready
    assert scheduler.service.step_s(8, 4) == pytest.approx(0.01)


def _simulate_overload(
    rate_per_s: float, duration_s: float, fixed_s: float, per_row_s: float
) -> Counter[str]:
    """Poisson arrivals of 1-row full-depth requests (1 s deadlines) against a scheduler whose steps take
    ``fixed_s + per_row_s * rows`` of fake time: the overload experiment without torch or HTTP."""
    scheduler = make_scheduler(
        max_batch_size=64, max_batch_tokens=16384, max_queue_size=1024, max_wait_ms=2.0
    )
    num_tokens = 62
    for n in (1, 8, 16, 64) * 2:  # what start-up calibration does
        scheduler.service.observe_step(n * num_tokens, n * num_tokens, fixed_s + per_row_s * n)
    rng = random.Random(0)
    arrivals, t = [], 0.0
    while t < duration_s:
        t += rng.expovariate(rate_per_s)
        arrivals.append(t)
    outcomes: Counter[str] = Counter()
    admitted_at: dict[int, float] = {}
    now, next_arrival = 0.0, 0
    runner = FakeRunner({})
    while next_arrival < len(arrivals) or scheduler.has_work():
        while next_arrival < len(arrivals) and arrivals[next_arrival] <= now:
            arrived = arrivals[next_arrival]
            next_arrival += 1
            try:
                request_id, rows = add_request(scheduler, 1, arrived, num_tokens, deadline_s=arrived + 1.0)
            except QueueFullError:
                outcomes["429"] += 1
                continue
            runner.exit_layer_by_request[request_id] = 6
            admitted_at[rows[0]] = arrived
        decision = scheduler.schedule(now)
        outcomes["504"] += len(decision.expired)
        if decision.plan is None:
            now = arrivals[next_arrival] if next_arrival < len(arrivals) else now + 0.001
            continue
        step_s = fixed_s + per_row_s * decision.plan.num_rows
        now += step_s
        output = runner.execute(decision.plan)
        for row, _ in scheduler.update_from_output(decision.plan, output, step_s):
            outcomes["200" if now - admitted_at[row.row_id] <= 1.0 else "late"] += 1
    return outcomes


@pytest.mark.parametrize("factor", [1.5, 2.0])
def test_overload_keeps_goodput_at_capacity_with_no_compute_wasted(factor: float) -> None:
    # The 2-core CPU's default model at 40 words: 4 ms per step + 5.8 ms per row (measured).
    fixed_s, per_row_s = 0.004, 0.0058
    capacity_rps = 13 / (6 * (fixed_s + per_row_s * 13))  # 13-row cohorts: what a 1 s deadline allows
    duration_s = 30.0
    outcomes = _simulate_overload(factor * capacity_rps, duration_s, fixed_s, per_row_s)
    assert outcomes["200"] / duration_s >= 0.95 * capacity_rps, outcomes
    assert outcomes["late"] == 0 and outcomes["504"] <= 0.01 * outcomes["200"], outcomes
    assert outcomes["429"] >= 0.9 * (factor - 1) * capacity_rps * duration_s, outcomes
