"""The engine: one worker thread joining the admission queue, the scheduler and the runner.

``classify`` (called on the event loop) tokenizes, admits the rows and awaits one future per request. The
worker thread loops ``schedule -> execute -> update_from_output`` and resolves a request's future as soon as
its last row exits. An exception while computing a step fails only the requests with rows in that step;
the loop goes on and logs it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from model_store.criteria import CRITERION_CODES, Criterion, threshold_for
from model_store.store import LoadedModel
from model_store.text import RowTokenizer
from server.engine.errors import (
    BatchFailedError,
    DeadlineExceededError,
    EngineError,
    InvalidRequestError,
    NotReadyError,
    PayloadTooLargeError,
    QueueFullError,
    RequestCancelledError,
)
from server.engine.guard import AccuracyGuard, AutoAdjuster, speed_bucket
from server.engine.runner import Runner
from server.engine.scheduler import Decision, RowExit, RowSpec, Scheduler, SchedulerConfig, StepPlan
from server.engine.types import (
    ClassifyOptions,
    ClassifyResult,
    EngineConfig,
    EngineObserver,
    ModelInfo,
    NullObserver,
    RowOutcome,
)

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.05


class EngineState(StrEnum):
    STOPPED = "stopped"
    RUNNING = "running"
    RESTARTING = "restarting"  # the watchdog found the worker hung or dead and is replacing it
    DRAINING = "draining"


@dataclass
class _Request:
    request_id: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[ClassifyResult]
    options: ClassifyOptions
    row_ids: list[int]
    truncated: list[bool]
    admitted_s: float
    predicted_answer_s: float = 0.0  # what admission foresaw (it learns from the difference)
    outcomes: dict[int, RowOutcome] = field(default_factory=dict)
    first_step_s: float | None = None


class Engine:
    """Serves one model version. Thread-safe entry points: ``classify``, ``is_ready``, ``stop``."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        observer: EngineObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._loaded = loaded
        self._manifest = loaded.manifest
        self._observer: EngineObserver = observer or NullObserver()
        self._clock = clock
        self._tokenizer = RowTokenizer(loaded.tokenizer, loaded.manifest.max_seq_length)
        self._runner = Runner(loaded.model, device=config.device, dtype=config.dtype)
        self._scheduler = Scheduler(
            SchedulerConfig(
                max_batch_size=config.max_batch_size,
                max_batch_tokens=config.max_batch_tokens,
                max_wait_ms=config.max_wait_ms,
                max_queue_size=config.max_queue_size,
                mode=config.mode,
                max_inflight_rows=config.max_inflight_rows,
                num_layers=self._manifest.num_layers,
                max_shadow_rows=config.max_shadow_rows,
                max_queue_wait_ms=config.max_queue_wait_ms,
            )
        )
        # The manifest's tables as JSON, once: dumping them cost ~0.35 ms per request.
        self._calibration_json = (
            loaded.manifest.calibration.model_dump(mode="json") if loaded.manifest.calibration else None
        )
        self._provenance_json = loaded.manifest.provenance.model_dump(mode="json")
        self._tokens_per_char = 0.25  # EWMA over admitted texts: token estimate for the early refusal
        if config.calibrate_step_cost:
            self._calibrate_step_cost()
        expected = expected_agreement(loaded)
        self.guard = AccuracyGuard(config.guard_sample_fraction, expected)
        self.adjuster: AutoAdjuster | None = None
        if config.auto_adjust:
            default_bucket = speed_bucket(self._manifest.default_speed)
            target = config.auto_adjust_target_agreement or expected.get(default_bucket, 0.99)
            self.adjuster = AutoAdjuster(
                self._manifest.default_speed, target_agreement=target, window=config.auto_adjust_window
            )
        self._shadow_of: dict[int, tuple[int, float, bool]] = {}  # row -> (early label, speed, was default)
        self._lock = threading.RLock()  # guards the scheduler and the request tables, from both threads
        self._wakeup = threading.Condition(self._lock)
        self._requests: dict[int, _Request] = {}
        self._row_owner: dict[int, tuple[int, int]] = {}  # row id -> (request id, input index)
        self._state = EngineState.STOPPED
        self._thread: threading.Thread | None = None
        # A hung thread cannot be killed: a restart bumps the generation and the old thread, should it
        # ever come back, sees that it is stale and leaves without touching anything.
        self._generation = 0
        self._busy_since_s: float | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.num_restarts = 0

    def _calibrate_step_cost(self) -> None:
        """Time a few layer steps of synthetic rows (1 to a full batch, short and long) so admission
        predicts from the first request on; this also warms the kernels up. About a second on a CPU."""
        m = self._manifest
        max_rows = self.config.max_batch_size
        lengths = sorted({min(16, m.max_seq_length), min(64, m.max_seq_length)})
        sizes = sorted({1, max(1, max_rows // 4), max_rows})
        token_id = int(self._runner.pad_token_id) + 1
        torch.set_grad_enabled(False)
        for num_tokens in lengths:
            for num_rows in sizes:
                num_rows = min(num_rows, max(1, self.config.max_batch_tokens // num_tokens))
                rows = tuple(
                    RowSpec(self._scheduler.next_id(), 0, (token_id,) * num_tokens, 0, 0.0, m.num_layers)
                    for _ in range(num_rows)
                )
                for _ in range(2):
                    cohort_id = self._scheduler.next_id()
                    plan = StepPlan(self._scheduler.next_id(), 1, cohort_id, rows, {})
                    started_s = time.perf_counter()
                    output = self._runner.execute(plan)
                    duration_s = time.perf_counter() - started_s
                    self._scheduler.service.observe_step(
                        num_rows * num_tokens, output.num_padded_tokens, duration_s
                    )
                    self._runner.reset()
        fixed_s, per_token_s = self._scheduler.service.cost.coefficients()
        logger.info(
            "layer step cost: %.2f ms + %.2f us per padded token (admission predicts with it)",
            fixed_s * 1000.0,
            per_token_s * 1e6,
        )

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker thread; the engine is ready when this returns."""
        with self._lock:
            if self._state is not EngineState.STOPPED:
                return
            self._state = EngineState.RUNNING
            self._start_thread()
        self._watchdog = asyncio.create_task(self._watch(), name="exitserve-watchdog")

    def _start_thread(self) -> None:
        self._busy_since_s = None
        self._thread = threading.Thread(
            target=self._thread_main, args=(self._generation,), name="exitserve-engine", daemon=True
        )
        self._thread.start()

    async def _watch(self) -> None:
        """Restart the worker when it died or one step ran longer than ``step_timeout_s``."""
        while self._state is not EngineState.STOPPED:
            await asyncio.sleep(self.config.watchdog_interval_s)
            thread, busy_since_s = self._thread, self._busy_since_s
            if self._state not in (EngineState.RUNNING, EngineState.DRAINING) or thread is None:
                continue
            if not thread.is_alive():
                self._restart("the engine thread died")
            elif busy_since_s is not None and self._clock() - busy_since_s > self.config.step_timeout_s:
                self._restart(f"a step ran longer than {self.config.step_timeout_s:.1f} s")

    def _restart(self, reason: str) -> None:
        logger.error("engine watchdog: %s; failing in-flight requests and restarting the worker", reason)
        with self._lock:
            was_draining = self._state is EngineState.DRAINING
            self._state = EngineState.RESTARTING
            self._generation += 1
            self._scheduler.reset()
            self._shadow_of.clear()
            self._runner = Runner(self._loaded.model, device=self.config.device, dtype=self.config.dtype)
            victims = list(self._requests.values())
        for request in victims:
            self._fail(request, NotReadyError("engine restarting after a fault; retry"))
        self.num_restarts += 1
        self._observer.engine_restarted()
        with self._lock:
            self._state = EngineState.DRAINING if was_draining else EngineState.RUNNING
            self._start_thread()

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let in-flight ones finish (up to ``drain_timeout_s``), stop the thread."""
        with self._lock:
            if self._state is EngineState.STOPPED:
                return
            self._state = EngineState.DRAINING
            self._wakeup.notify_all()
        give_up_s = self._clock() + drain_timeout_s
        while self._requests and self._clock() < give_up_s:
            await asyncio.sleep(0.01)
        with self._lock:
            self._state = EngineState.STOPPED
            leftover = list(self._requests.values())
            self._wakeup.notify_all()
        if self._watchdog is not None:
            self._watchdog.cancel()
        for request in leftover:  # their rows are dropped too, not left to compute for nobody
            self._cancel(request, NotReadyError("server shutting down: drain timeout reached"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)

    @property
    def default_speed(self) -> float:
        """The speed for requests that set none: the calibrated default, or where auto-adjust moved it."""
        return self.adjuster.speed if self.adjuster is not None else self._manifest.default_speed

    def is_ready(self) -> bool:
        return self._state is EngineState.RUNNING and self._thread is not None and self._thread.is_alive()

    @property
    def model_info(self) -> ModelInfo:
        m = self._manifest
        return ModelInfo(
            name=m.name,
            version=m.version,
            architecture=m.architecture,
            num_layers=m.num_layers,
            labels=list(m.labels),
            max_seq_length=m.max_seq_length,
            default_criterion=m.default_criterion,
            default_speed=self.default_speed,
            calibration=self._calibration_json,
            provenance=self._provenance_json,
            live_guard=self._live_guard(),
        )

    def _live_guard(self) -> dict[str, object]:
        adjuster = self.adjuster
        return {
            "sample_fraction": self.guard.sample_fraction,
            "expected_agreement": dict(self.guard.expected_agreement),
            "num_dropped": self._scheduler.num_shadow_dropped,
            "buckets": self.guard.live_curve(),
            "auto_adjust": None
            if adjuster is None
            else {
                "enabled": True,
                "target_agreement": adjuster.target_agreement,
                "calibrated_default_speed": adjuster.max_speed,
                "current_default_speed": adjuster.speed,
                "changes": [vars(c) for c in adjuster.changes],
            },
        }

    # --- requests ---------------------------------------------------------------------------------

    async def classify(
        self,
        texts: list[str],
        options: ClassifyOptions,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> ClassifyResult:
        """Classify ``texts``; raises an ``EngineError`` subclass on refusal, timeout or failure."""
        if not self.is_ready():
            raise NotReadyError("engine is not ready")
        if not texts:
            raise InvalidRequestError("inputs must not be empty", field="inputs")
        if len(texts) > self.config.max_inputs_per_request:
            raise PayloadTooLargeError(
                f"{len(texts)} inputs exceed the limit of {self.config.max_inputs_per_request} per request"
            )
        if options.max_layers is not None and options.max_layers < 1:
            raise InvalidRequestError("max_layers must be at least 1", field="max_layers")
        policy = self._policy(options)
        self._refuse_early(texts, policy, options.deadline_s)
        encoded = await asyncio.to_thread(self._tokenize, texts)
        if self.config.strict_length and any(truncated for _, truncated in encoded):
            index = next(i for i, (_, truncated) in enumerate(encoded) if truncated)
            raise PayloadTooLargeError(
                f"inputs[{index}] is longer than {self._manifest.max_seq_length} tokens (strict length mode)"
            )
        self._learn_token_ratio(texts, encoded)
        request = self._admit(encoded, options, policy)
        return await self._await(request, is_disconnected)

    def _policy(self, options: ClassifyOptions) -> tuple[int, float, int]:
        """(criterion code, native threshold, max layers) of a request's rows."""
        m = self._manifest
        threshold = threshold_for(options.criterion, options.speed, len(m.labels), m.num_layers)
        max_layers = min(options.max_layers or m.num_layers, m.num_layers)
        return CRITERION_CODES[options.criterion], threshold, max_layers

    def _refuse_early(
        self, texts: list[str], policy: tuple[int, float, int], deadline_s: float | None
    ) -> None:
        """Admission check before tokenizing, on estimated token counts: an overloaded engine refuses
        for almost no CPU, leaving it to the requests it can still answer."""
        max_tokens = self._manifest.max_seq_length
        ratio = self._tokens_per_char
        mean_tokens = sum(min(max_tokens, 2 + ratio * len(t)) for t in texts) / len(texts)
        with self._lock:
            layers = self._scheduler.service.depth.expected_layers(*policy)
            self._checked(
                self._scheduler.check_admission, len(texts), mean_tokens, layers, deadline_s, self._clock()
            )

    def _learn_token_ratio(self, texts: list[str], encoded: list[tuple[tuple[int, ...], bool]]) -> None:
        num_chars = sum(len(t) for t, (_, truncated) in zip(texts, encoded, strict=True) if not truncated)
        num_tokens = sum(len(ids) for ids, truncated in encoded if not truncated)
        if num_chars > 0:
            self._tokens_per_char += 0.05 * (num_tokens / num_chars - self._tokens_per_char)

    def _checked(self, admit: Callable[..., float], *args: object) -> float:
        """Run an admission call (its predicted answer seconds); count a refusal by its reason."""
        try:
            return admit(*args)
        except QueueFullError as e:
            self._observer.admission_refused(e.reason)
            raise
        except DeadlineExceededError:
            self._observer.admission_refused("deadline_unreachable")
            raise

    def _tokenize(self, texts: list[str]) -> list[tuple[tuple[int, ...], bool]]:
        """Token ids per text; a text the tokenizer rejects is the client's error, named by index."""
        try:
            return self._tokenizer(texts)
        except Exception:
            for index, text in enumerate(texts):
                try:
                    self._tokenizer([text])
                except Exception as e:
                    raise InvalidRequestError(
                        f"inputs[{index}] cannot be tokenized ({type(e).__name__})", field=f"inputs[{index}]"
                    ) from None
            raise  # no single text fails alone: a server fault, not the client's

    def _admit(
        self,
        encoded: list[tuple[tuple[int, ...], bool]],
        options: ClassifyOptions,
        policy: tuple[int, float, int],
    ) -> _Request:
        criterion_code, threshold, max_layers = policy
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._state is not EngineState.RUNNING:
                raise NotReadyError("engine is not ready")
            request_id = self._scheduler.next_id()
            rows = [
                RowSpec(
                    row_id=self._scheduler.next_id(),
                    request_id=request_id,
                    token_ids=ids,
                    criterion_code=criterion_code,
                    threshold=threshold,
                    max_layers=max_layers,
                    deadline_s=options.deadline_s,
                )
                for ids, _ in encoded
            ]
            now_s = self._clock()
            predicted_s = self._checked(self._scheduler.add_rows, rows, now_s)  # may refuse
            request = _Request(
                request_id=request_id,
                loop=loop,
                future=loop.create_future(),
                options=options,
                row_ids=[r.row_id for r in rows],
                truncated=[t for _, t in encoded],
                admitted_s=now_s,
                predicted_answer_s=predicted_s,
            )
            self._requests[request_id] = request
            for index, row in enumerate(rows):
                self._row_owner[row.row_id] = (request_id, index)
            self._report_depths()
            self._wakeup.notify()
        return request

    async def _await(
        self, request: _Request, is_disconnected: Callable[[], Awaitable[bool]] | None
    ) -> ClassifyResult:
        deadline_s = request.options.deadline_s
        while True:
            timeout_s = DISCONNECT_POLL_S if is_disconnected else None
            if deadline_s is not None:
                remaining_s = max(0.0, deadline_s - self._clock())
                timeout_s = remaining_s if timeout_s is None else min(timeout_s, remaining_s)
            done, _ = await asyncio.wait({request.future}, timeout=timeout_s)
            if done:
                return request.future.result()
            if deadline_s is not None and self._clock() >= deadline_s:
                self._cancel(
                    request, DeadlineExceededError("deadline passed before the request was answered")
                )
            elif is_disconnected is not None and await is_disconnected():
                self._cancel(request, RequestCancelledError("client disconnected"))

    def _cancel(self, request: _Request, error: EngineError) -> None:
        with self._lock:
            self._scheduler.cancel_request(request.request_id)
            if isinstance(error, DeadlineExceededError) and request.request_id in self._requests:
                # A missed deadline teaches admission too (the answer would have come later still):
                # learning only from the answered would never see the predictions that failed.
                elapsed_s = self._clock() - request.admitted_s
                self._scheduler.service.observe_answer(request.predicted_answer_s, elapsed_s)
            self._wakeup.notify()
        self._fail(request, error)

    # --- the worker thread ------------------------------------------------------------------------

    def _thread_main(self, generation: int) -> None:
        try:
            self._run(generation)
        except Exception:
            logger.exception("engine thread crashed; the watchdog will restart it")

    def _run(self, generation: int) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                decision = self._next_decision(generation)
                if decision is None:
                    return
                plan = decision.plan
                if plan is not None:
                    self._mark_started(plan)
                    self._busy_since_s = self._clock()
                runner = self._runner
                shed = self._scheduler.take_dropped_shadow_rows()
                for row_id in shed:
                    self._shadow_of.pop(row_id, None)
            if shed:  # shadow rows shed under load
                self._observer.guard_dropped(len(shed))
            self._expire(decision)
            if plan is None:
                continue
            started_s = time.perf_counter()
            try:
                output = runner.execute(plan)
            except Exception:
                logger.exception(
                    "step %d (layer %d, %d rows) failed", plan.step_id, plan.layer, plan.num_rows
                )
                with self._lock:
                    if generation != self._generation:
                        return
                    self._busy_since_s = None
                self._fail_step(plan)
                continue
            with self._lock:
                if generation != self._generation:
                    return  # the watchdog replaced this thread while it was computing
                self._busy_since_s = None
            if plan.layer > 0:
                self._observer.layer_step(plan.layer, plan.num_rows, output.num_padded_tokens)
            duration_s = time.perf_counter() - started_s
            with self._lock:
                finished = self._scheduler.update_from_output(plan, output, duration_s)
                self._report_depths()
                self._finish_rows(finished)

    def _next_decision(self, generation: int) -> Decision | None:
        """Under the lock: wait for work; None when the engine stopped or this thread was replaced."""
        while True:
            if self._state is EngineState.STOPPED or generation != self._generation:
                return None
            if self._scheduler.has_work():
                decision = self._scheduler.schedule(self._clock())
                if decision.plan is not None or decision.expired:
                    return decision
                if decision.wake_at_s is not None:
                    self._wakeup.wait(max(0.0, decision.wake_at_s - self._clock()))
                    continue
            self._wakeup.wait(0.5)

    def _mark_started(self, plan: StepPlan) -> None:
        now_s = self._clock()
        for row in plan.new_rows:
            request = self._requests.get(row.request_id)
            if request is not None and request.first_step_s is None:
                request.first_step_s = now_s
                self._observer.queue_wait(now_s - request.admitted_s)

    def _expire(self, decision: Decision) -> None:
        if decision.expired:
            num_in_flight = decision.num_expired_in_flight
            self._observer.deadline_dropped(len(decision.expired) - num_in_flight, num_in_flight)
        for request_id in {row.request_id for row in decision.expired}:
            request = self._requests.get(request_id)
            if request is not None:
                self._cancel(
                    request, DeadlineExceededError("deadline passed before the request was answered")
                )

    def _fail_step(self, plan: StepPlan) -> None:
        with self._lock:
            failed = self._scheduler.fail_step(plan)  # the runner already let go of the step's rows
        self._observer.batch_failed(len(failed))
        for request_id in failed:
            request = self._requests.get(request_id)
            if request is not None:
                self._fail(request, BatchFailedError("internal error while computing the batch"))

    def _finish_rows(self, finished: list[tuple[RowSpec, RowExit]]) -> None:
        labels = self._manifest.labels
        num_layers = self._manifest.num_layers
        for row, row_exit in finished:
            if row.shadow:
                self._record_shadow(row, row_exit)
                continue
            owner = self._row_owner.pop(row.row_id, None)
            request = self._requests.get(row.request_id)
            self._observer.row_exited(row_exit.exit_layer, num_layers)
            if owner is None or request is None:
                continue
            _, index = owner
            request.outcomes[index] = RowOutcome(
                label=labels[row_exit.label_index],
                label_index=row_exit.label_index,
                score=row_exit.probs[row_exit.label_index],
                probs=list(row_exit.probs),
                exit_layer=row_exit.exit_layer,
                num_layers_run=row_exit.exit_layer,
                truncated=request.truncated[index],
            )
            if self.guard.should_sample(row_exit.exit_layer, num_layers):
                self._add_shadow(row, row_exit, request.options)
            if len(request.outcomes) == len(request.row_ids):
                self._complete(request)

    def _add_shadow(self, row: RowSpec, row_exit: RowExit, options: ClassifyOptions) -> None:
        """Queue a full-depth re-run of an early exit; the scheduler runs it only in spare capacity."""
        shadow = RowSpec(
            row_id=self._scheduler.next_id(),
            request_id=0,
            token_ids=row.token_ids,
            criterion_code=CRITERION_CODES[Criterion.NORMALIZED_ENTROPY],
            threshold=0.0,  # never exits early
            max_layers=self._manifest.num_layers,
            shadow=True,
        )
        if self._scheduler.add_shadow_row(shadow):
            self._shadow_of[shadow.row_id] = (row_exit.label_index, options.speed, options.speed_is_default)
        else:
            self._observer.guard_dropped(1)  # the shadow cap is reached

    def _record_shadow(self, row: RowSpec, row_exit: RowExit) -> None:
        meta = self._shadow_of.pop(row.row_id, None)
        if meta is None:
            return
        early_label, speed, was_default = meta
        agreed = early_label == row_exit.label_index
        self._observer.guard_result(self.guard.record(speed, early_label, row_exit.label_index), agreed)
        if self.adjuster is not None and was_default:
            change = self.adjuster.observe(speed, agreed)
            if change is not None:
                self._observer.default_speed_changed(change.new_speed)

    def _complete(self, request: _Request) -> None:
        now_s = self._clock()
        self._scheduler.service.observe_answer(request.predicted_answer_s, now_s - request.admitted_s)
        started_s = request.first_step_s if request.first_step_s is not None else now_s
        result = ClassifyResult(
            rows=[request.outcomes[i] for i in range(len(request.row_ids))],
            model=self._manifest.name,
            version=self._manifest.version,
            criterion=request.options.criterion,
            speed=request.options.speed,
            queue_time_s=started_s - request.admitted_s,
            inference_time_s=now_s - started_s,
        )
        self._forget(request)
        request.loop.call_soon_threadsafe(_set_result, request.future, result)

    def _fail(self, request: _Request, error: EngineError) -> None:
        self._forget(request)
        request.loop.call_soon_threadsafe(_set_exception, request.future, error)

    def _forget(self, request: _Request) -> None:
        with self._lock:
            self._requests.pop(request.request_id, None)
            for row_id in request.row_ids:
                self._row_owner.pop(row_id, None)
            self._observer.inflight(len(self._requests), len(self._row_owner))

    def _report_depths(self) -> None:
        self._observer.queue_depth(self._scheduler.num_waiting)
        self._observer.predicted_backlog(self._scheduler.predicted_backlog_s())


def _set_result(future: asyncio.Future[ClassifyResult], result: ClassifyResult) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[ClassifyResult], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


def expected_agreement(loaded: LoadedModel) -> dict[str, float]:
    """Calibrated agreement of early exits with full depth, per speed bucket, for the default criterion."""
    calibration = loaded.manifest.calibration
    if calibration is None:
        return {}
    expected: dict[str, float] = {}
    for point in calibration.points:
        agreement = getattr(point, "early_exit_agreement", None)
        if point.criterion == loaded.manifest.default_criterion and agreement is not None:
            expected.setdefault(speed_bucket(point.speed), float(agreement))
    return expected
