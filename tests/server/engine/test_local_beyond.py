"""Anytime answers, degradation before 429 and the trust figure through the in-process engine (core
thread, client, real tiny model). Steps are slowed to a known cost by the runner factory's hook, so the
engine's own step-cost model predicts what these tests reason about."""

from __future__ import annotations

import asyncio
import time

import pytest

from model_store.criteria import Criterion
from model_store.policy import CRITERION_CODES
from model_store.store import LoadedModel
from server.engine.admission import DegradeLevel
from server.engine.errors import DeadlineExceededError, QueueFullError
from server.engine.local import LocalEngine
from server.engine.scheduler import StepPlan
from server.engine.types import ClassifyOptions, EngineConfig
from tests.server.engine.test_local import hooked
from tests.tiny_models import tiny_loaded_model

pytestmark = [pytest.mark.model, pytest.mark.serial]  # steps slowed to a known wall-clock cost

STEP_S = 0.025


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_loaded_model(num_layers=4, max_seq_length=24, calibrated=True)


def _slow(plan: StepPlan, num: int) -> None:
    time.sleep(STEP_S)


async def _warm(engine: LocalEngine) -> None:
    """Full-depth requests one after another: the engine times enough slowed steps to predict them."""
    for _ in range(3):
        await engine.classify(["warm up"], ClassifyOptions(criterion=Criterion.NORMALIZED_ENTROPY, speed=0.0))


async def test_best_effort_answers_from_the_deepest_ramp_at_the_deadline(loaded: LoadedModel) -> None:
    config = EngineConfig(max_batch_size=4, max_wait_ms=0.0, calibrate_step_cost=False)
    engine = LocalEngine(loaded, config, runner_factory=hooked(_slow))
    await engine.start()
    try:
        await _warm(engine)
        # Full depth takes 4 x 25 ms; 150 ms allows a few layers, not all (a layer ends >= 2 x 27.5 ms
        # + 5 ms before the deadline, so the cut comes after layer 2 or 3).
        deadline_s = time.monotonic() + 0.15
        started = time.monotonic()
        options = ClassifyOptions(
            criterion=Criterion.NORMALIZED_ENTROPY, speed=0.0, deadline_s=deadline_s - 0.06, best_effort=True
        )
        result = await engine.classify(["free money now", "team lunch"], options)
        elapsed_s = time.monotonic() - started
        assert all(row.deadline_exit for row in result.rows)
        assert all(1 <= row.exit_layer < 4 for row in result.rows)
        assert elapsed_s <= 0.09 + 0.05  # before its deadline (with scheduling noise)
        for row in result.rows:
            assert row.full_depth_agreement is not None and 0.0 < row.full_depth_agreement <= 1.0
        # The same request without best effort cannot be answered in time: refused at once.
        plain = ClassifyOptions(
            criterion=Criterion.NORMALIZED_ENTROPY, speed=0.0, deadline_s=time.monotonic() + 0.09
        )
        with pytest.raises(DeadlineExceededError):
            await engine.classify(["free money now"], plain)
        # Full depth answers state agreement 1 (the answer is full depth's).
        full = await engine.classify(["team lunch"], ClassifyOptions(criterion=Criterion.MAX_PROB, speed=0.0))
        assert full.rows[0].exit_layer == 4 and full.rows[0].full_depth_agreement == 1.0
    finally:
        await engine.stop()


FASTEST = DegradeLevel(
    criterion_code=CRITERION_CODES[Criterion.MAX_PROB],
    threshold=float("-inf"),  # speed 1: every row leaves at layer 1
    speed=1.0,
    drop_pts=5.0,
    mean_exit_layer=1.0,
)


async def _burst(engine: LocalEngine, levels: tuple[DegradeLevel, ...]) -> list[object]:
    deadline_s = time.monotonic() + 0.3
    options = ClassifyOptions(
        criterion=Criterion.NORMALIZED_ENTROPY,
        speed=0.0,
        deadline_s=deadline_s,
        drop_pts=0.0,
        degrade_levels=levels,
    )
    jobs = [engine.classify([f"offer {i}"], options) for i in range(12)]
    return list(await asyncio.gather(*jobs, return_exceptions=True))


async def test_overload_degrades_within_the_budget_before_refusing(loaded: LoadedModel) -> None:
    config = EngineConfig(max_batch_size=2, max_wait_ms=0.0, calibrate_step_cost=False)
    engine = LocalEngine(loaded, config, runner_factory=hooked(_slow))
    await engine.start()
    try:
        await _warm(engine)
        # 12 rows, 2 per step, 4 layers each: 24 steps = 600 ms of full depth for a 300 ms deadline.
        plain = await _burst(engine, ())
        refused = [r for r in plain if isinstance(r, QueueFullError)]
        assert refused, plain
        await asyncio.sleep(0.7)  # what was admitted finishes
        degraded = await _burst(engine, (FASTEST,))
        # The first rows still fit at full depth and run so; the later ones degrade instead of being
        # refused (a few may still be: the full-depth rows admitted first hold the steps ahead).
        still_refused = [r for r in degraded if isinstance(r, QueueFullError)]
        assert len(still_refused) < len(refused), (len(still_refused), len(refused))
        answered = [r for r in degraded if not isinstance(r, BaseException)]
        runs = [r for r in answered if r.degraded]  # type: ignore[attr-defined]
        assert runs and len(answered) > len(plain) - len(refused), degraded
        for result in runs:
            assert result.speed == 1.0 and result.criterion is Criterion.MAX_PROB  # type: ignore[attr-defined]
            assert result.requested_speed == 0.0 and result.predicted_drop_pts == 5.0  # type: ignore[attr-defined]
            assert result.rows[0].exit_layer == 1  # type: ignore[attr-defined]
        kept = [r for r in answered if not r.degraded]  # type: ignore[attr-defined]
        assert kept and all(r.rows[0].exit_layer == 4 for r in kept)  # type: ignore[attr-defined]
    finally:
        await engine.stop()
