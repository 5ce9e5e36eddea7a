"""Anytime answers, degradation before shedding, and the trust figure: the scheduler with a fake runner
and hand-fed step timings (a fake clock: every ``now_s`` is given), ``admission.admit`` on a known
prediction, the degrade plan and the agreement table on known numbers. No torch model."""

from __future__ import annotations

import math

import pytest
import torch

from model_store.calibration import agreement_table, exit_candidates
from model_store.manifest import AgreementTable, CalibrationPoint, CalibrationTable
from model_store.policy import CRITERION_CODES, Criterion
from model_store.trust import BinCheck, check_as_defined, check_as_served, wilson_interval
from server.engine.admission import (
    ADMISSION_MARGIN,
    Backlog,
    DegradeLevel,
    ServicePrediction,
    admit,
)
from server.engine.errors import DeadlineExceededError, InvalidRequestError, QueueFullError
from server.engine.scheduler import DEADLINE_REPLY_SLACK_S, RowExit, RowSpec, Scheduler
from server.engine.shadow import ShadowSampler
from server.engine.targets import MAX_DEGRADE_LEVELS, degrade_plan
from server.engine.types import EngineConfig, NullObserver
from tests.server.engine.fakes import FakeRunner, add_request, layer_probs, make_scheduler, step

pytestmark = pytest.mark.unit

STEP_S = 0.010  # every step these tests pretend to have timed costs 10 ms, whatever its size


def _timed(scheduler: Scheduler) -> Scheduler:
    for num_tokens in (8, 64) * 4:  # one cost whatever the size: a fixed 10 ms per step
        scheduler.service.observe_step(num_tokens, num_tokens, STEP_S)
    assert scheduler.service.prediction().step_s(8, 64) == pytest.approx(STEP_S)
    return scheduler


# --- anytime answers ------------------------------------------------------------------------------


def _cut_horizon_s() -> float:
    """How close to its deadline a best-effort row in flight is answered (two full steps + slack)."""
    return DEADLINE_REPLY_SLACK_S + 2 * ADMISSION_MARGIN * STEP_S


def test_best_effort_row_is_answered_from_its_deepest_ramp_before_the_deadline() -> None:
    scheduler = _timed(make_scheduler())
    deadline_s = 0.05  # 6 layers take 60 ms: cut after 3 (the fourth could end after 30 + 27 ms)
    a, a_rows = add_request(scheduler, 2, deadline_s=deadline_s, best_effort=True)
    b, b_rows = add_request(scheduler, 1)  # no deadline: untouched
    runner = FakeRunner({a: 6, b: 6})
    now_s, layers_done = 0.0, 0
    while now_s + _cut_horizon_s() <= deadline_s:
        decision = scheduler.schedule(now_s)
        assert not decision.deadline_exits
        assert decision.plan is not None and decision.plan.keep_probs
        scheduler.update_from_output(decision.plan, runner.execute(decision.plan))
        layers_done += 1
        now_s += STEP_S
    decision = scheduler.schedule(now_s)
    assert layers_done == 3
    assert sorted(row.row_id for row, _ in decision.deadline_exits) == a_rows
    for _, row_exit in decision.deadline_exits:
        assert row_exit.deadline_exit and row_exit.exit_layer == layers_done
        assert row_exit.probs == layer_probs(layers_done) and row_exit.label_index == 1
    assert not decision.expired  # answered, not a 504
    assert decision.plan is not None
    assert sorted(r for rows in decision.plan.dropped.values() for r in rows) == a_rows  # runner forgets
    assert decision.plan.row_ids == b_rows
    assert not decision.plan.keep_probs  # no best-effort row is live any more


def test_best_effort_row_with_no_layer_computed_expires_and_error_rows_are_unchanged() -> None:
    scheduler = make_scheduler(max_batch_size=1)  # untimed: admits by count
    blocker, _ = add_request(scheduler, 1)
    _, waiting_rows = add_request(scheduler, 1, deadline_s=0.05, best_effort=True)
    runner = FakeRunner({blocker: 6})
    step(scheduler, runner, now_s=0.0)  # the blocker holds the only slot
    _timed(scheduler)
    decision = scheduler.schedule(0.06)
    assert [r.row_id for r in decision.expired] == waiting_rows  # never computed: the request gets 504
    assert not decision.deadline_exits
    # A row without best effort is dropped in flight as before.
    scheduler = _timed(make_scheduler())
    c, c_rows = add_request(scheduler, 1, deadline_s=0.1)
    runner = FakeRunner({c: 6})
    step(scheduler, runner, now_s=0.0)
    decision = scheduler.schedule(0.095)  # one more 10 ms step would end past the deadline
    assert [r.row_id for r in decision.expired] == c_rows and not decision.deadline_exits


def test_steps_report_probabilities_only_while_a_best_effort_row_is_live() -> None:
    scheduler = _timed(make_scheduler())
    a, _ = add_request(scheduler, 1)
    runner = FakeRunner({a: 2})
    decision = scheduler.schedule(0.0)
    assert decision.plan is not None and not decision.plan.keep_probs
    scheduler.update_from_output(decision.plan, runner.execute(decision.plan))
    b, _ = add_request(scheduler, 1, deadline_s=10.0, best_effort=True)
    runner.exit_layer_by_request[b] = 1
    decision = scheduler.schedule(0.0)
    assert decision.plan is not None and decision.plan.keep_probs


# --- degrade before shedding ----------------------------------------------------------------------

PREDICTION = ServicePrediction(
    ready=True, fixed_s=STEP_S, per_token_s=0.0, max_rows_per_step=8, max_tokens_per_step=10_000
)
LEVELS = tuple(
    DegradeLevel(CRITERION_CODES[Criterion.MAX_PROB], 1.0 - 0.1 * i, 0.1 * i, 0.2 * i, layers)
    for i, layers in enumerate((5.0, 3.0, 2.0, 1.0), start=1)
)


def _admit(ahead_rows: float, deadline_s: float | None, **kwargs: object) -> object:
    """8 rows at full depth (6 layers) behind ``ahead_rows`` row-layers queued."""
    return admit(
        PREDICTION,
        Backlog(ahead_rows, ahead_rows * 4, 6.0),
        8,
        4.0,
        6.0,
        deadline_s,
        0.0,
        500.0,
        levels=LEVELS,
        level_layers=tuple(level.mean_exit_layer for level in LEVELS),
        **kwargs,  # type: ignore[arg-type]
    )


def test_admission_runs_the_least_degraded_setting_that_is_answered_in_time() -> None:
    # Idle: its own setting (6 steps = 60 ms) fits a 100 ms deadline.
    admitted = _admit(0.0, 0.1)
    assert admitted.level is None  # type: ignore[attr-defined]
    # 48 row-layers ahead (6 steps): full depth would take 120 ms; 3 layers, 90 ms x margin, fits.
    admitted = _admit(48.0, 0.1)
    assert admitted.level is LEVELS[1]  # type: ignore[attr-defined]
    assert admitted.expected_layers == 3.0  # type: ignore[attr-defined]
    # Nothing fits behind 160 row-layers (20 steps): the refusal of its own setting stands.
    with pytest.raises(QueueFullError) as refused:
        _admit(160.0, 0.1)
    assert refused.value.reason == "deadline"
    # A deadline too short for its own setting even when idle is met by degrading (not a 504).
    admitted = _admit(0.0, 0.015)
    assert admitted.level is LEVELS[3]  # type: ignore[attr-defined]
    with pytest.raises(DeadlineExceededError):
        _admit(0.0, 0.005)


def test_deadline_less_requests_degrade_to_meet_the_latency_target() -> None:
    admitted = _admit(48.0, None)  # no target: only the queue-wait bound (met), so its own setting
    assert admitted.level is None  # type: ignore[attr-defined]
    admitted = _admit(48.0, None, target_latency_s=0.1)
    assert admitted.level is LEVELS[1]  # type: ignore[attr-defined]
    # No level meets the target: the fastest one still admitted (less load than refusing nothing).
    admitted = _admit(160.0, None, target_latency_s=0.1)
    assert admitted.level is LEVELS[3]  # type: ignore[attr-defined]


def test_best_effort_is_admitted_at_the_fastest_level_when_one_layer_fits() -> None:
    levels = LEVELS[:3]  # the fastest runs 2 layers on average

    def best_effort(ahead_rows: float, deadline_s: float, best_effort: bool = True) -> object:
        return admit(
            PREDICTION,
            Backlog(ahead_rows, ahead_rows * 4, 6.0),
            8,
            4.0,
            6.0,
            deadline_s,
            0.0,
            500.0,
            levels=levels,
            level_layers=tuple(level.mean_exit_layer for level in levels),
            best_effort=best_effort,
        )

    # 20 steps ahead (200 ms): 2 more layers end at 220 ms x margin = 242 ms, one at 231 ms.
    with pytest.raises(QueueFullError):
        best_effort(160.0, 0.235, best_effort=False)
    admitted = best_effort(160.0, 0.235)
    assert admitted.cut_at_deadline and admitted.level is levels[-1]  # type: ignore[attr-defined]
    assert admitted.predicted_s == 0.0  # type: ignore[attr-defined]  # teaches the correction nothing
    with pytest.raises(QueueFullError):  # not even one layer in time
        best_effort(400.0, 0.235)
    # Unless the rows ahead are best-effort rows cut by 150 ms: then the wait is that, and 2 layers fit.
    cut = admit(
        PREDICTION,
        Backlog(400.0, 1600.0, 6.0),
        8,
        4.0,
        6.0,
        0.235,
        0.0,
        500.0,
        levels=levels,
        level_layers=tuple(level.mean_exit_layer for level in levels),
        best_effort=True,
        cut_wait_s=0.15,
    )
    assert cut.cut_at_deadline and cut.expected_layers == 1.0  # (150 + 20) x 1.1 > 185 > (150 + 10) x 1.1


def test_the_wait_of_a_best_effort_row_is_bounded_by_the_cuts_ahead() -> None:
    scheduler = _timed(make_scheduler(max_batch_size=8))
    add_request(scheduler, 8, deadline_s=0.2, best_effort=True)  # cut by 200 ms at the latest
    add_request(scheduler, 8, deadline_s=0.2, best_effort=True)
    assert scheduler._cut_wait_s(0.0) == pytest.approx(0.2)
    add_request(scheduler, 8)  # no deadline: 6 layers in full (8 rows a step): 60 ms, under the cut
    assert scheduler._cut_wait_s(0.0) == pytest.approx(0.2)
    assert scheduler._cut_wait_s(0.15) == pytest.approx(0.06)


def test_scheduler_queues_degraded_rows_at_the_level_it_chose() -> None:
    scheduler = _timed(make_scheduler(max_batch_size=8))
    for _ in range(3):
        add_request(scheduler, 8)  # 24 rows x 6 layers ahead, no deadline
    request_id = scheduler.next_id()
    rows = [
        RowSpec(
            row_id=scheduler.next_id(),
            request_id=request_id,
            token_ids=(1, 2, 3, 4),
            criterion_code=0,
            threshold=0.0,
            max_layers=6,
            deadline_s=0.25,  # 18 steps ahead: 6 more layers end at 240 ms x margin, 3 at 210 ms
        )
        for _ in range(8)
    ]
    queued, admitted = scheduler.add_rows(rows, 0.0, LEVELS)
    assert admitted.level is LEVELS[1]
    assert {(r.criterion_code, r.threshold) for r in queued} == {
        (admitted.level.criterion_code, admitted.level.threshold)
    }
    assert scheduler.backlog().row_layers == pytest.approx(24 * 6 + 8 * admitted.expected_layers)


def _point(criterion: Criterion, speed: float, accuracy: float, mean_exit_layer: float) -> CalibrationPoint:
    return CalibrationPoint(
        criterion=criterion,
        speed=speed,
        accuracy=accuracy,
        mean_exit_layer=mean_exit_layer,
        layers_saved=1 - mean_exit_layer / 6,
        expected_speedup=6 / mean_exit_layer,
    )


NE, MP = Criterion.NORMALIZED_ENTROPY, Criterion.MAX_PROB
TABLE = CalibrationTable(
    split="dev",
    num_examples=1000,
    full_depth_accuracy=0.980,
    points=[
        _point(NE, 0.0, 0.980, 6.0),
        _point(NE, 0.1, 0.980, 3.0),
        _point(NE, 0.2, 0.978, 2.5),
        _point(MP, 0.2, 0.975, 2.6),  # dominated: slower and worse than NE 0.2
        _point(NE, 0.4, 0.974, 1.8),
        _point(NE, 0.6, 0.960, 1.2),  # 2 points: over a 1-point budget
    ],
)


def test_degrade_plan_is_the_calibrated_frontier_within_the_budget_least_degraded_first() -> None:
    plan = degrade_plan(TABLE, NE, 0.0, 1.0, num_labels=2, num_layers=6)
    assert plan.drop_pts == 0.0
    assert [(level.speed, level.mean_exit_layer) for level in plan.levels] == [
        (0.1, 3.0),
        (0.2, 2.5),
        (0.4, 1.8),
    ]
    assert plan.levels[1].drop_pts == pytest.approx(0.2)
    assert plan.levels[0].criterion_code == CRITERION_CODES[NE] and plan.levels[0].threshold == 0.1
    # From a faster setting, only faster levels; its own calibrated drop is reported.
    plan = degrade_plan(TABLE, NE, 0.2, 1.0, num_labels=2, num_layers=6)
    assert plan.drop_pts == pytest.approx(0.2) and [v.speed for v in plan.levels] == [0.4]
    assert degrade_plan(TABLE, NE, 0.0, 0.1, 2, 6).levels[-1].speed == 0.1
    with pytest.raises(InvalidRequestError) as e:
        degrade_plan(None, NE, 0.0, 1.0, 2, 6)
    assert e.value.field == "overload_max_accuracy_drop"


def test_degrade_plan_keeps_at_most_the_cap_and_always_the_fastest() -> None:
    points = [_point(NE, 0.0, 0.98, 6.0)] + [
        _point(NE, round(0.01 * i, 2), 0.98 - 0.0001 * i, 6.0 - 0.1 * i) for i in range(1, 40)
    ]
    table = CalibrationTable(split="dev", num_examples=1000, full_depth_accuracy=0.98, points=points)
    levels = degrade_plan(table, NE, 0.0, 1.0, 2, 6).levels
    assert len(levels) == MAX_DEGRADE_LEVELS
    assert levels[-1].mean_exit_layer == pytest.approx(6.0 - 3.9)
    means = [level.mean_exit_layer for level in levels]
    assert means == sorted(means, reverse=True)


# --- the trust figure -----------------------------------------------------------------------------


def _logits(probs_per_layer: list[list[float]]) -> torch.Tensor:
    """One row per inner list of top-class probabilities (binary: label 1 if p > 0.5) per layer."""
    p = torch.tensor(probs_per_layer)
    return torch.log(torch.stack([1 - p, p], dim=-1))


def test_agreement_table_counts_a_row_where_a_threshold_policy_could_exit_it() -> None:
    logits = _logits(
        [
            [0.995, 0.999, 0.9995],  # confident all along: counts at 1, 2, 3 (confidence never drops)
            [0.25, 0.8, 0.97],  # wrong at layer 1 (label 0), right later
            [0.97, 0.8, 0.99],  # layer 2 less confident than layer 1: not counted at layer 2
        ]
    )
    _, agreed, counts = exit_candidates(logits)
    assert counts.tolist() == [[True, True, True], [True, True, True], [True, False, True]]
    assert agreed[:, 0].tolist() == [True, False, True]
    table = agreement_table(logits).model_copy(update={"min_cell_rows": 1})  # one cell per used bin
    edges = table.confidence_edges
    assert sum(table.num_rows[0]) == 3 and sum(table.num_rows[1]) == 2
    b = table.bin_index(0.75)  # 1 - 0.25: the wrong row's confidence at layer 1
    assert edges[b] <= 0.75 < edges[b + 1]
    assert table.num_rows[0][b] == 1 and table.num_agreed[0][b] == 0
    assert table.agreement(1, 0.75) == pytest.approx(0.5 / 2)  # (0 + 0.5) / (1 + 1)
    assert table.agreement(3, 0.51) == 1.0  # the last layer is full depth
    assert table.bin_index(1.0) == len(edges) - 2
    # With the default cell size, a layer of 3 rows is one cell: its bins all state the pooled share.
    pooled = agreement_table(logits)
    assert {pooled.agreement(1, c) for c in (0.3, 0.75, 0.97, 0.9999)} == {round((2 + 0.5) / (3 + 1), 4)}
    assert pooled.cell(1, 0.75).label == "0-1"


def test_cells_merge_adjacent_bins_until_each_holds_enough_rows() -> None:
    table = AgreementTable(
        num_rows=[[10, 0, 25, 50, 5, 60, 3, 100], [0] * 8],
        num_agreed=[[5, 0, 20, 49, 5, 60, 3, 99], [0] * 8],
        min_cell_rows=40,
    )
    cells = {(c.first, c.last, c.num_rows, c.label) for c in table.cells()[0]}
    # 10 + 0 + 25 < 40, + 50: one cell; 5 + 60; 3 + 100.
    assert cells == {(0, 3, 85, "0-0.9"), (4, 5, 65, "0.9-0.99"), (6, 7, 103, "0.99-1")}
    assert table.agreement(1, 0.65) == round((74 + 0.5) / (85 + 1), 4)
    assert table.agreement(2, 0.65) == 1.0  # the last layer


def test_agreement_table_survives_the_manifest_round_trip() -> None:
    table = agreement_table(_logits([[0.9, 0.95], [0.6, 0.99]]))
    again = AgreementTable.model_validate_json(table.model_dump_json())
    assert again.cells() == table.cells()
    assert not math.isnan(again.agreement(1, 0.93))


def test_trust_checks_on_the_calibration_rows_themselves_observe_what_is_stated() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 4, 3, generator=generator) * 3
    table = agreement_table(logits)
    defined = check_as_defined(table, logits)
    assert defined and all(c.num_rows >= table.min_cell_rows for c in defined)
    for check in defined:
        assert check.stated == pytest.approx((check.num_agreed + 0.5) / (check.num_rows + 1))
        assert check.holds
    served = check_as_served(table, logits, Criterion.MAX_PROB, (0.2, 0.5, 0.8, 1.0))
    assert sum(c.num_rows for c in served) <= sum(c.num_rows for c in defined)  # served exits are a subset
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    far = BinCheck(1, "0-1", 0.99, 100, 50, *wilson_interval(50, 100))
    assert not far.holds


class _TrustObserver(NullObserver):
    def __init__(self) -> None:
        self.trust: list[tuple[int, str, bool]] = []

    def guard_trust_result(self, layer: int, bin_label: str, agreed: bool) -> None:
        self.trust.append((layer, bin_label, agreed))


def test_shadow_re_runs_are_tallied_per_trust_cell() -> None:
    table = AgreementTable(
        num_rows=[[50, 0, 0, 0, 0, 0, 0, 50], [0] * 8, [0] * 8],
        num_agreed=[[40, 0, 0, 0, 0, 0, 0, 50], [0] * 8, [0] * 8],
    )
    observer = _TrustObserver()
    sampler = ShadowSampler(EngineConfig(guard_sample_fraction=1.0), 3, 0.5, {}, observer, trust=table)
    scheduler = make_scheduler(num_layers=3)
    rows = []
    for confidence, full_label in ((0.55, 1), (0.9995, 0)):
        _, (row_id,) = add_request(scheduler, 1)
        row = scheduler._rows[row_id]
        sampler.offer(scheduler, row, RowExit(row_id, 0, (confidence, 1 - confidence), 1), 0.5, False)
        rows.append(full_label)
    shadows = list(scheduler._shadow_waiting)
    assert len(shadows) == 2
    for shadow, full_label in zip(shadows, rows, strict=True):
        sampler.finished(shadow, RowExit(shadow.row_id, full_label, (0.5, 0.5), 3))
    cell_low, cell_high = table.cell(1, 0.55).label, table.cell(1, 0.9995).label
    assert observer.trust == [(1, cell_low, False), (1, cell_high, True)]
