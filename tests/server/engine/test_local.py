"""The in-process engine (core thread + client + supervisor, real torch runner) against the reference
forward. Faults are injected through the runner factory, never by patching private attributes."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable

import pytest

from model_store.criteria import Criterion
from model_store.reference import RowPolicies, early_exit_forward
from model_store.store import LoadedModel
from model_store.text import encode_texts
from server.api.state import ReceiveWatch
from server.engine.errors import BatchFailedError, DeadlineExceededError, NotReadyError, QueueFullError
from server.engine.local import LocalEngine as Engine
from server.engine.runner import Runner
from server.engine.scheduler import StepOutput, StepPlan
from server.engine.types import BatchingMode, ClassifyOptions, EngineConfig
from tests.tiny_models import tiny_loaded_model

pytestmark = pytest.mark.model

WORDS = [
    *("free", "money", "offer", "meeting", "agenda", "report", "click"),
    *("now", "winner", "project", "lunch", "invoice", "urgent", "team"),
]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_loaded_model(num_layers=4, max_seq_length=24)


class HookedRunner(Runner):
    """The real runner, with a hook called before each step: it may block, raise, or return a
    replacement output (a malformed one crashes the core loop)."""

    hook: Callable[[StepPlan, int], object] | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.num_steps = 0
        self.computed: list[StepPlan] = []

    def execute(self, plan: StepPlan) -> StepOutput:
        self.num_steps += 1
        if self.hook is not None:
            replaced = self.hook(plan, self.num_steps)
            if replaced is not None:
                return replaced  # type: ignore[return-value]
        self.computed.append(plan)
        return super().execute(plan)


def hooked(hook: Callable[[StepPlan, int], object], runners: list[HookedRunner] | None = None):
    """A runner factory whose runners call ``hook(plan, step number)`` first (steps counted per core)."""

    def factory(loaded: LoadedModel, config: EngineConfig) -> Runner:
        runner = HookedRunner(loaded.model, device=config.device, dtype=config.dtype)
        runner.hook = hook
        if runners is not None:
            runners.append(runner)
        return runner

    return factory


async def until_ready(engine: Engine, timeout_s: float = 10.0) -> None:
    """The supervisor restarts a core in the background: wait until the new one serves."""
    for _ in range(int(timeout_s / 0.01)):
        if engine.is_ready():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine did not come back")


def _texts(num: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(num)]


def _reference(loaded: LoadedModel, text: str, criterion: Criterion, speed: float, max_layers: int | None):
    batch = encode_texts(loaded.tokenizer, [text], loaded.manifest.max_seq_length)
    policies = RowPolicies.from_rows([criterion], [speed], [max_layers], 3, loaded.model.num_layers)
    return early_exit_forward(loaded.model, batch.input_ids, batch.attention_mask, policies)[0]


@pytest.mark.parametrize("mode", [BatchingMode.REFILL, BatchingMode.SHRINK])
async def test_concurrent_requests_match_reference_alone(loaded: LoadedModel, mode: BatchingMode) -> None:
    # Answers, not admission: no queue-wait bound, so a slow machine cannot refuse the burst.
    config = EngineConfig(max_batch_size=8, max_wait_ms=1.0, mode=mode, max_queue_wait_ms=None)
    engine = Engine(loaded, config)
    await engine.start()
    rng = random.Random(1)
    jobs = []
    for i in range(40):
        texts = _texts(rng.randint(1, 3), seed=i)
        options = ClassifyOptions(
            criterion=rng.choice(list(Criterion)),
            speed=rng.choice([0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0]),
            max_layers=rng.choice([None, None, None, 2]),
        )
        jobs.append((texts, options))
    try:
        results = await asyncio.gather(*(engine.classify(t, o) for t, o in jobs))
    finally:
        await engine.stop()
    exit_layers = set()
    for (texts, options), result in zip(jobs, results, strict=True):
        assert result.criterion is options.criterion and result.speed == options.speed
        for text, row in zip(texts, result.rows, strict=True):
            expected = _reference(loaded, text, options.criterion, options.speed, options.max_layers)
            assert row.exit_layer == expected.exit_layer, (text, options)
            assert row.num_layers_run == expected.num_layers_run
            assert row.label_index == expected.label_index
            assert row.label == loaded.manifest.labels[expected.label_index]
            assert row.probs == pytest.approx(expected.probs, abs=1e-5)
            assert row.score == pytest.approx(max(expected.probs), abs=1e-5)
            exit_layers.add(row.exit_layer)
    assert len(exit_layers) >= 3, exit_layers


async def test_failed_step_fails_only_its_requests(loaded: LoadedModel) -> None:
    def fail_first(plan: StepPlan, num: int) -> None:
        if num == 1:
            raise RuntimeError("injected fault")

    config = EngineConfig(max_batch_size=2, max_wait_ms=0.0, calibrate_step_cost=False)
    engine = Engine(loaded, config, runner_factory=hooked(fail_first))
    await engine.start()
    options = ClassifyOptions(criterion=Criterion.NORMALIZED_ENTROPY, speed=0.0)
    try:
        first = asyncio.create_task(engine.classify(["one", "two"], options))
        await asyncio.sleep(0.05)  # admitted first, so it is the failing step
        second = asyncio.create_task(engine.classify(["three"], options))
        with pytest.raises(BatchFailedError):
            await first
        result = await second
        assert result.rows[0].exit_layer == 4
        assert engine.is_ready()
    finally:
        await engine.stop()


async def test_queue_full_and_not_ready(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig(max_queue_size=2))
    options = ClassifyOptions(criterion=Criterion.NORMALIZED_ENTROPY, speed=0.5)
    with pytest.raises(NotReadyError):
        await engine.classify(["x"], options)
    await engine.start()
    try:
        with pytest.raises(QueueFullError):
            await engine.classify(["a", "b", "c"], options)
    finally:
        await engine.stop()


async def test_deadline_in_the_past_gives_deadline_error(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig())
    await engine.start()
    try:
        import time

        options = ClassifyOptions(
            criterion=Criterion.NORMALIZED_ENTROPY, speed=0.0, deadline_s=time.monotonic()
        )
        with pytest.raises(DeadlineExceededError):
            await engine.classify(["late"], options)
        ok = await engine.classify(["fine"], ClassifyOptions(criterion=Criterion.MAX_PROB, speed=1.0))
        assert ok.rows[0].exit_layer == 1
    finally:
        await engine.stop()


class _RecordingObserver:
    def __init__(self) -> None:
        self.restarts = 0

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None

    def engine_restarted(self) -> None:
        self.restarts += 1


async def test_watchdog_restarts_a_hung_engine(loaded: LoadedModel) -> None:
    observer = _RecordingObserver()
    release = threading.Event()

    def hang_first_core(plan: StepPlan, num: int) -> None:
        if len(runners) == 1:  # the first core hangs in its first step; its successor computes
            release.wait(10)

    runners: list[HookedRunner] = []
    engine = Engine(
        loaded,
        EngineConfig(step_timeout_s=0.3, watchdog_interval_s=0.05, calibrate_step_cost=False),
        observer=observer,  # type: ignore[arg-type]
        runner_factory=hooked(hang_first_core, runners),
    )
    await engine.start()
    options = ClassifyOptions(criterion=Criterion.NORMALIZED_ENTROPY, speed=0.0)
    try:
        with pytest.raises(NotReadyError, match="restarting"):
            await asyncio.wait_for(engine.classify(["stuck"], options), timeout=5)
        assert observer.restarts == 1
        await until_ready(engine)
        assert len(runners) == 2
        result = await asyncio.wait_for(engine.classify(["after restart"], options), timeout=5)
        assert result.rows[0].exit_layer == 4
    finally:
        release.set()
        await engine.stop()


async def test_watchdog_restarts_a_crashed_engine(loaded: LoadedModel) -> None:
    def garbage_once(plan: StepPlan, num: int) -> object:
        return "not a StepOutput" if len(runners) == 1 else None  # the core loop crashes on it

    runners: list[HookedRunner] = []
    config = EngineConfig(watchdog_interval_s=0.05, calibrate_step_cost=False)
    engine = Engine(loaded, config, runner_factory=hooked(garbage_once, runners))
    await engine.start()
    options = ClassifyOptions(criterion=Criterion.NORMALIZED_ENTROPY, speed=0.0)
    try:
        with pytest.raises(NotReadyError):
            await asyncio.wait_for(engine.classify(["boom"], options), timeout=5)
        await until_ready(engine)
        result = await asyncio.wait_for(engine.classify(["fine"], options), timeout=5)
        assert result.rows[0].exit_layer == 4 and engine.num_restarts == 1
    finally:
        await engine.stop()


async def test_disconnected_client_is_dropped_before_compute(loaded: LoadedModel) -> None:
    from server.engine.errors import RequestCancelledError

    release = threading.Event()
    runners: list[HookedRunner] = []
    config = EngineConfig(max_batch_size=1, max_wait_ms=0.0, calibrate_step_cost=False)
    engine = Engine(
        loaded, config, runner_factory=hooked(lambda plan, num: release.wait(10) and None, runners)
    )
    await engine.start()
    options = ClassifyOptions(criterion=Criterion.MAX_PROB, speed=1.0)
    gone = asyncio.Event()

    async def wait_disconnect() -> object:
        await gone.wait()
        return {"type": "http.disconnect"}

    try:
        first = asyncio.create_task(engine.classify(["first"], options))
        await asyncio.sleep(0.2)  # first is computing (held at the gate); second waits in the queue
        second = asyncio.create_task(
            engine.classify(["second", "more"], options, ReceiveWatch(wait_disconnect))
        )
        await asyncio.sleep(0.1)
        gone.set()  # the client of the second request goes away
        with pytest.raises(RequestCancelledError):
            await asyncio.wait_for(second, timeout=2)
        release.set()
        assert (await first).rows[0].exit_layer == 1
        await asyncio.sleep(0.2)
        computed = [r.token_ids for plan in runners[0].computed for r in plan.new_rows]
        assert len(computed) == 1  # only "first": the second request's two rows never ran
        assert engine.core is not None and engine.core.scheduler.num_waiting == 0
        assert engine.core.num_live_requests == 0
    finally:
        release.set()
        await engine.stop()


async def test_stop_past_the_drain_timeout_fails_leftovers_and_drops_their_rows(loaded: LoadedModel) -> None:
    release = threading.Event()
    runners: list[HookedRunner] = []
    config = EngineConfig(max_batch_size=1, max_wait_ms=0.0, calibrate_step_cost=False)
    # the first step blocks until the drain has given up
    engine = Engine(
        loaded, config, runner_factory=hooked(lambda plan, num: release.wait(10) and None, runners)
    )
    await engine.start()
    options = ClassifyOptions(criterion=Criterion.NORMALIZED_ENTROPY, speed=0.0)
    pending = [asyncio.create_task(engine.classify([f"text {i}"], options)) for i in range(3)]
    await asyncio.sleep(0.2)  # admitted: one row computing, two waiting
    stopping = asyncio.create_task(engine.stop(drain_timeout_s=0.2))
    await asyncio.sleep(0.5)
    release.set()
    await stopping
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(r, NotReadyError) for r in results), results
    assert "drain timeout" in str(results[0])
    # The leftovers' rows were dropped, not left to compute: only the step held at the gate ran.
    assert len(runners[0].computed) == 1


async def test_requests_of_one_loop_turn_reach_the_core_as_one_message_in_order(loaded: LoadedModel) -> None:
    """The client queues what one turn of the event loop sends and sends it as one multipart message:
    one read in the core for a burst of requests, adds and aborts in the order they were made."""
    import zmq

    from model_store.tokens import RowTokenizer
    from server.engine.client import EngineClient
    from server.engine.errors import RequestCancelledError
    from server.engine.info import static_model_info
    from server.engine.messages import (
        AbortRequest,
        AddRequest,
        AdmissionView,
        Finished,
        Hello,
        Outputs,
        Status,
        decode_to_core,
        encode,
    )
    from server.engine.types import NullObserver

    config = EngineConfig()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    core = context.socket(zmq.ROUTER)
    core.bind("inproc://one-turn")
    client = EngineClient(
        static_model_info(loaded.manifest, 0.0),
        RowTokenizer(loaded.tokenizer, loaded.manifest.max_seq_length),
        config,
        NullObserver(),
    )
    try:
        client.connect(1, "inproc://one-turn", context)
        await asyncio.sleep(0.01)
        identity, hello = core.recv_multipart()
        assert isinstance(decode_to_core(hello), Hello)
        core.send_multipart([identity, encode(Status(1, True, 0.5, AdmissionView(), []))])
        for _ in range(100):
            if client.is_ready():
                break
            await asyncio.sleep(0.01)
        assert client.is_ready()
        options = ClassifyOptions(criterion=Criterion.MAX_PROB, speed=0.5)
        gone = asyncio.Event()

        async def disconnect() -> None:
            await gone.wait()

        calls = [asyncio.ensure_future(client.classify([t], options)) for t in _texts(5, seed=3)]
        left = asyncio.ensure_future(
            client.classify(["the client leaves"], options, disconnect=ReceiveWatch(disconnect))
        )
        await asyncio.sleep(0.01)
        identity, *frames = core.recv_multipart(zmq.NOBLOCK)
        adds = [decode_to_core(f) for f in frames]
        assert all(isinstance(m, AddRequest) for m in adds) and len(adds) == 6
        ids = [m.request_id for m in adds]  # type: ignore[union-attr]
        assert ids == sorted(ids)
        gone.set()
        with pytest.raises(RequestCancelledError):
            await left
        _, abort = core.recv_multipart(zmq.NOBLOCK)
        assert decode_to_core(abort) == AbortRequest(ids[-1])
        rows = [(0, [0.75, 0.25], 1, False)]
        finished = [Finished(request_id, rows, 0.001, 0.002) for request_id in ids[:-1]]
        core.send_multipart([identity, encode(Outputs(finished, []))])
        results = await asyncio.wait_for(asyncio.gather(*calls), 5.0)
        assert [r.rows[0].exit_layer for r in results] == [1] * 5
    finally:
        client.close()
        core.close(linger=0)
        context.term()
