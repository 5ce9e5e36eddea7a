"""A fake runner whose exits are scripted per (request, layer), and small factories. No torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.scheduler import RowExit, RowSpec, Scheduler, SchedulerConfig, StepOutput, StepPlan
from server.engine.types import BatchingMode


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@dataclass
class FakeRunner:
    """Tracks cohorts like the real runner; a row exits at the layer scripted for its request."""

    exit_layer_by_request: dict[int, int]
    num_layers: int = 6
    cohorts: dict[int, list[int]] = field(default_factory=dict)
    request_of_row: dict[int, int] = field(default_factory=dict)
    plans: list[StepPlan] = field(default_factory=list)

    def execute(self, plan: StepPlan) -> StepOutput:
        self.plans.append(plan)
        for cohort_id, row_ids in plan.dropped.items():
            remaining = [r for r in self.cohorts.get(cohort_id, []) if r not in row_ids]
            if remaining:
                self.cohorts[cohort_id] = remaining
            else:
                self.cohorts.pop(cohort_id, None)
        rows: list[int] = []
        for row in plan.new_rows:
            self.request_of_row[row.row_id] = row.request_id
            rows.append(row.row_id)
        for cohort_id, row_ids in plan.sources.items():
            cohort = self.cohorts[cohort_id]
            assert all(r in cohort for r in row_ids), "scheduler took rows the cohort does not hold"
            rows.extend(row_ids)
            remaining = [r for r in cohort if r not in row_ids]
            if remaining:
                self.cohorts[cohort_id] = remaining
            else:
                del self.cohorts[cohort_id]
        exited, survivors = [], []
        for row_id in rows:
            target = self.exit_layer_by_request[self.request_of_row[row_id]]
            if plan.layer >= min(target, self.num_layers):
                exited.append(RowExit(row_id, 0, (1.0, 0.0), plan.layer))
            else:
                survivors.append(row_id)
        if survivors:
            self.cohorts[plan.out_cohort_id] = survivors
        survivor_probs = tuple(layer_probs(plan.layer) for _ in survivors) if plan.keep_probs else ()
        return StepOutput(exited=tuple(exited), survivors=tuple(survivors), survivor_probs=survivor_probs)


def layer_probs(layer: int) -> tuple[float, float]:
    """What the fake ramp of ``layer`` says for a surviving row: label 1, surer the deeper."""
    return (0.4 - 0.05 * layer, 0.6 + 0.05 * layer)


def make_scheduler(**overrides: object) -> Scheduler:
    base: dict[str, object] = dict(
        max_batch_size=8, max_batch_tokens=10_000, max_wait_ms=0.0, max_queue_size=100, num_layers=6
    )
    base.update(overrides)
    if "mode" in base:
        base["mode"] = BatchingMode(str(base["mode"]))
    return Scheduler(SchedulerConfig(**base))  # type: ignore[arg-type]


def add_request(
    scheduler: Scheduler,
    num_rows: int,
    now_s: float = 0.0,
    num_tokens: int = 4,
    deadline_s: float | None = None,
    best_effort: bool = False,
) -> tuple[int, list[int]]:
    request_id = scheduler.next_id()
    rows = [
        RowSpec(
            row_id=scheduler.next_id(),
            request_id=request_id,
            token_ids=tuple(range(num_tokens)),
            criterion_code=0,
            threshold=0.5,
            max_layers=6,
            deadline_s=deadline_s,
            best_effort=best_effort,
        )
        for _ in range(num_rows)
    ]
    scheduler.add_rows(rows, now_s)
    return request_id, [r.row_id for r in rows]


def step(scheduler: Scheduler, runner: FakeRunner, now_s: float = 0.0) -> list[tuple[RowSpec, RowExit]]:
    """One schedule -> execute -> update round; returns the rows that finished."""
    decision = scheduler.schedule(now_s)
    assert decision.plan is not None, "expected work"
    return scheduler.update_from_output(decision.plan, runner.execute(decision.plan))
