"""The engine core: the one owner of all engine state, fed only by messages.

Its loop (after vLLM v1's ``EngineCore``): drain the inbox -> schedule -> execute -> update -> send what
finished, batched per front end (``server/engine/messages.py``). No lock is shared with any event loop:
front ends hold futures and talk to the core by message only. The same loop runs as a thread in the server
process (``server/engine/local.py``) or as its own process (``server/supervisor.py``).

Per message: an ``AddRequest`` is admitted or refused at once (``Failed`` carries the 429/504 and its
Retry-After); an ``AbortRequest`` drops the rows. Deadlines are checked here, at every schedule, so no
request needs a timer of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model_store.store import LoadedModel
from server.engine.admission import MIN_PREDICTION_TO_LEARN_S, DegradeLevel
from server.engine.errors import (
    BatchFailedError,
    DeadlineExceededError,
    EngineError,
    NotReadyError,
    QueueFullError,
)
from server.engine.guard import speed_bucket
from server.engine.messages import (
    STATUS_INTERVAL_S,
    AbortRequest,
    AddRequest,
    AdmissionView,
    CoreSocket,
    Failed,
    Finished,
    Hello,
    Outputs,
    Status,
    ToCore,
    unpack_token_ids,
)
from server.engine.runner import Runner
from server.engine.scheduler import Decision, RowExit, RowSpec, Scheduler, SchedulerConfig, StepPlan
from server.engine.shadow import ShadowSampler
from server.engine.types import EngineConfig, EngineObserver, NullObserver

logger = logging.getLogger(__name__)

RunnerFactory = Callable[[LoadedModel, EngineConfig], Runner]


def default_runner(loaded: LoadedModel, config: EngineConfig) -> Runner:
    return Runner(
        loaded.model,
        device=config.device,
        dtype=config.dtype,
        cuda_graphs=config.cuda_graphs,
        max_batch_size=config.max_batch_size,
        max_seq_length=loaded.manifest.max_seq_length,
    )


@dataclass(slots=True)
class _Live:
    """A request the core admitted and has not answered."""

    identity: bytes  # the front end it came from
    request_id: int  # the front end's id
    internal_id: int  # the scheduler's
    message: AddRequest
    admitted_s: float
    predicted_answer_s: float
    row_ids: list[int]
    # Per input, in order: (label index, probabilities, exit layer, answered at the deadline); the
    # request is answered when ``num_left`` (rows not yet exited) reaches 0.
    outcomes: list[tuple[int, list[float], int, bool] | None]
    num_left: int
    first_step_s: float | None = None
    level: DegradeLevel | None = None  # the degraded setting it runs at, if any


def scheduler_config(config: EngineConfig, num_layers: int) -> SchedulerConfig:
    return SchedulerConfig(
        max_batch_size=config.max_batch_size,
        max_batch_tokens=config.max_batch_tokens,
        max_wait_ms=config.max_wait_ms,
        max_queue_size=config.max_queue_size,
        mode=config.mode,
        max_inflight_rows=config.max_inflight_rows,
        num_layers=num_layers,
        max_shadow_rows=config.max_shadow_rows,
        max_queue_wait_ms=config.max_queue_wait_ms,
        target_latency_ms=config.target_latency_ms,
    )


class EngineCore:
    """Owns the scheduler, the runner, the admitted requests and the shadow sampler of one model.

    Single-threaded: every method runs on the core's own thread. ``busy_since_s`` (0 when idle) is the
    one thing another thread reads: the supervisor's hang check.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        observer: EngineObserver | None = None,
        *,
        epoch: int = 1,
        runner_factory: RunnerFactory = default_runner,
        expected_agreement: dict[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_busy: Callable[[float], None] | None = None,
    ) -> None:
        self.config = config
        self._on_busy = on_busy  # also told busy_since_s (a supervisor in another process reads it)
        self.epoch = epoch
        self._manifest = loaded.manifest
        self._observer: EngineObserver = observer or NullObserver()
        self._clock = clock
        self._runner = runner_factory(loaded, config)
        self._scheduler = Scheduler(scheduler_config(config, loaded.manifest.num_layers))
        self.shadow = ShadowSampler(
            config,
            loaded.manifest.num_layers,
            loaded.manifest.default_speed,
            expected_agreement or {},
            self._observer,
            loaded.manifest.calibration.agreement_table if loaded.manifest.calibration else None,
        )
        self._live: dict[tuple[bytes, int], _Live] = {}
        self._by_internal: dict[int, _Live] = {}
        self._row_owner: dict[int, tuple[_Live, int]] = {}  # row id -> (request, input index)
        self._clients: set[bytes] = set()
        self._outbox: dict[bytes, Outputs] = {}
        self._accepting = True
        self._wake_at_s: float | None = None
        self._last_status_s = 0.0
        self.busy_since_s = 0.0
        if config.calibrate_step_cost:
            self.calibrate_step_cost()

    # --- the loop -----------------------------------------------------------------------------------

    def run(self, socket: CoreSocket, should_stop: Callable[[], bool]) -> None:
        """Serve until ``should_stop()``; checked at least every ``STATUS_INTERVAL_S``."""
        torch.set_grad_enabled(False)
        with torch.inference_mode():  # once for the loop, not per step (``Runner.execute``)
            while not should_stop():
                for identity, message in socket.receive(self._idle_timeout_s()):
                    self.handle(identity, message)
                if should_stop():
                    return
                self.step()
                self.flush(socket)

    def _busy(self, since_s: float) -> None:
        self.busy_since_s = since_s
        if self._on_busy is not None:
            self._on_busy(since_s)

    def _idle_timeout_s(self) -> float:
        if not self._scheduler.has_work():
            return STATUS_INTERVAL_S
        if self._wake_at_s is None:
            return 0.0
        return min(STATUS_INTERVAL_S, max(0.0, self._wake_at_s - self._clock()))

    def handle(self, identity: bytes, message: ToCore) -> None:
        """One message from a front end."""
        if isinstance(message, AddRequest):
            if message.epoch == self.epoch:
                self._add(identity, message)
        elif isinstance(message, AbortRequest):
            live = self._live.get((identity, message.request_id))
            if live is not None:
                self._scheduler.cancel_request(live.internal_id)
                self._forget(live)
        elif isinstance(message, Hello):
            self._clients.add(identity)
            self._outbox.setdefault(identity, Outputs([], []))
            self._last_status_s = 0.0  # a status goes out at the next flush, live guard included
            self.shadow.changed = True

    def step(self) -> None:
        """Schedule and, if a step is due, compute it and record what finished."""
        self._wake_at_s = None
        if not self._scheduler.has_work():
            return
        decision = self._scheduler.schedule(self._clock())
        shed = self._scheduler.take_dropped_shadow_rows()
        if shed:
            self.shadow.forget(shed, num_dropped_for_load=len(shed))
        if decision.deadline_exits:
            self._observer.deadline_exits(len(decision.deadline_exits))
            self._finish_rows(list(decision.deadline_exits))
        self._expire(decision)
        plan = decision.plan
        if plan is None:
            self._wake_at_s = decision.wake_at_s
            return
        self._mark_started(plan)
        self._busy(self._clock())
        started_s = time.perf_counter()
        try:
            output = self._runner.execute(plan)
        except Exception:
            logger.exception("step %d (layer %d, %d rows) failed", plan.step_id, plan.layer, plan.num_rows)
            self._busy(0.0)
            self._fail_step(plan)
            return
        duration_s = time.perf_counter() - started_s
        self._busy(0.0)
        if plan.layer > 0:
            self._observer.layer_step(plan.layer, plan.num_rows, output.num_padded_tokens)
        finished = self._scheduler.update_from_output(plan, output, duration_s)
        self._finish_rows(finished)

    def flush(self, socket: CoreSocket) -> None:
        """Send each front end what finished for it, and the status when due. The admission view (and
        the queue and backlog gauges) is computed only then: a step that answered nobody, with no status
        due, costs no pass over the rows in flight."""
        now_s = self._clock()
        status_due = now_s - self._last_status_s >= STATUS_INTERVAL_S
        ready = [(i, o) for i, o in self._outbox.items() if o.finished or o.failed]
        if not ready and not status_due:
            return
        admission = self.admission_view()
        for identity, outputs in ready:
            outputs.admission = admission
            socket.send(identity, outputs)
            self._outbox[identity] = Outputs([], [])
        self._observer.queue_depth(self._scheduler.num_waiting)
        self._observer.predicted_backlog(admission.backlog_s)
        if status_due:
            self._last_status_s = now_s
            status = self.status(admission)
            for identity in self._clients:
                socket.send(identity, status)

    def admission_view(self) -> AdmissionView:
        """The admission model and the work ahead, for the front ends' own check."""
        p = self._scheduler.service.prediction()
        ahead = self._scheduler.backlog()
        return AdmissionView(
            ready=p.ready,
            fixed_s=p.fixed_s,
            per_token_s=p.per_token_s,
            pad_ratio=p.pad_ratio,
            correction=p.correction,
            max_rows_per_step=p.max_rows_per_step,
            max_tokens_per_step=p.max_tokens_per_step,
            row_layers=ahead.row_layers,
            token_layers=ahead.token_layers,
            chain_layers=ahead.chain_layers,
            backlog_s=p.correction * p.drain_s(ahead) if p.ready else 0.0,
        )

    def status(self, admission: AdmissionView | None = None) -> Status:
        """Readiness, live default speed and guard (when changed), admission model and depth table."""
        changed = self.shadow.changed
        return Status(
            epoch=self.epoch,
            ready=self._accepting,
            default_speed=self.shadow.default_speed,
            admission=admission or self.admission_view(),
            depths=self._scheduler.service.depth.entries(),
            live_guard=self.shadow.live_guard(self._scheduler.num_shadow_dropped) if changed else None,
        )

    def stop_accepting(self) -> None:
        """Draining: new requests are refused with 503; admitted ones finish."""
        self._accepting = False
        self._last_status_s = 0.0

    @property
    def num_live_requests(self) -> int:
        return len(self._live)

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler

    # --- requests -----------------------------------------------------------------------------------

    def _add(self, identity: bytes, message: AddRequest) -> None:
        if not self._accepting:
            self._reply_failed(identity, message.request_id, NotReadyError("server is draining"))
            return
        internal_id = self._scheduler.next_id()
        best_effort = message.best_effort and message.deadline_s is not None
        rows = [
            RowSpec(
                row_id=self._scheduler.next_id(),
                request_id=internal_id,
                token_ids=unpack_token_ids(ids),
                criterion_code=message.criterion_code,
                threshold=message.threshold,
                max_layers=message.max_layers,
                deadline_s=message.deadline_s,
                best_effort=best_effort,
            )
            for ids in message.token_ids
        ]
        levels = tuple(DegradeLevel(*level) for level in message.levels)
        now_s = self._clock()
        try:
            rows, admitted = self._scheduler.add_rows(rows, now_s, levels)
        except QueueFullError as e:
            self._observer.admission_refused(e.reason)
            self._reply_failed(identity, message.request_id, e)
            return
        except DeadlineExceededError as e:
            self._observer.admission_refused("deadline_unreachable")
            self._reply_failed(identity, message.request_id, e)
            return
        live = _Live(
            identity=identity,
            request_id=message.request_id,
            internal_id=internal_id,
            message=message,
            admitted_s=now_s,
            predicted_answer_s=admitted.predicted_s,
            row_ids=[r.row_id for r in rows],
            outcomes=[None] * len(rows),
            num_left=len(rows),
            level=admitted.level,
        )
        if levels:  # a request that allows degradation: what it runs at is visible per speed bucket
            level = admitted.level
            speed = message.speed if level is None else level.speed
            drop_pts = message.drop_pts if level is None else level.drop_pts
            self._observer.admitted_at(
                speed_bucket(message.speed), speed, drop_pts, len(rows) if level is not None else 0
            )
        self._live[(identity, message.request_id)] = live
        self._by_internal[internal_id] = live
        for index, row in enumerate(rows):
            self._row_owner[row.row_id] = (live, index)

    def _mark_started(self, plan: StepPlan) -> None:
        """The requests whose first row starts in ``plan``: their queue wait ends now."""
        if not plan.new_rows:
            return
        now_s = self._clock()
        get_owner = self._row_owner.get
        waits_s: list[float] = []
        for row in plan.new_rows:
            owner = get_owner(row.row_id)
            if owner is not None:
                live = owner[0]
                if live.first_step_s is None:
                    live.first_step_s = now_s
                    waits_s.append(now_s - live.admitted_s)
        self._observer.queue_waits(waits_s)  # one report per step, not one per request

    def _expire(self, decision: Decision) -> None:
        if not decision.expired:
            return
        num_in_flight = decision.num_expired_in_flight
        self._observer.deadline_dropped(len(decision.expired) - num_in_flight, num_in_flight)
        for internal_id in {row.request_id for row in decision.expired}:
            live = self._by_internal.get(internal_id) if internal_id is not None else None
            if live is None or internal_id is None:
                continue
            # A missed deadline teaches admission too: learning only from the answered would never see
            # the predictions that failed.
            self._scheduler.service.observe_answer(live.predicted_answer_s, self._clock() - live.admitted_s)
            self._scheduler.cancel_request(internal_id)
            self._fail(live, DeadlineExceededError("deadline passed before the request was answered"))

    def _fail_step(self, plan: StepPlan) -> None:
        failed, shadow_ids = self._scheduler.fail_step(plan)  # the runner already let go of the rows
        self.shadow.forget(shadow_ids)
        if failed:
            self._observer.batch_failed(len(failed))
        for internal_id in failed:
            live = self._by_internal.get(internal_id)
            if live is not None:
                self._fail(live, BatchFailedError("internal error while computing the batch"))

    def _finish_rows(self, finished: list[tuple[RowSpec, RowExit]]) -> None:
        """Record the rows that left; answer every request whose last row this was. One pass over the
        rows, then one over the requests they completed, with the clock read and the exit metrics
        reported once per call, not per row (this runs for every row of every step)."""
        if not finished:
            return
        pop_owner = self._row_owner.pop
        sampling = self.shadow.sampling
        exits_at = [0] * (self._manifest.num_layers + 1)  # exit layer -> rows (a list: no hashing per row)
        completed: list[_Live] = []
        for row, row_exit in finished:
            if row.shadow:
                self.shadow.finished(row, row_exit)
                continue
            layer = row_exit.exit_layer
            exits_at[layer] += 1
            owner = pop_owner(row.row_id, None)
            if owner is None:
                continue
            live, index = owner
            probs = row_exit.probs
            if type(probs) is not list:
                probs = list(probs)
            live.outcomes[index] = (row_exit.label_index, probs, layer, row_exit.deadline_exit)
            if sampling and not row_exit.deadline_exit:  # the guard checks the policy, not the deadline cut
                message = live.message
                speed = message.speed if live.level is None else live.level.speed
                self.shadow.offer(self._scheduler, row, row_exit, speed, message.speed_is_default)
            live.num_left -= 1
            if not live.num_left:
                completed.append(live)
        if completed:
            self._complete(completed)
        num_layers = self._manifest.num_layers
        for layer, num_rows in enumerate(exits_at):
            if num_rows:
                self._observer.row_exited(layer, num_layers, num_rows)
        self._observer.inflight(len(self._live), len(self._row_owner))

    def _complete(self, completed: list[_Live]) -> None:
        """Answer the requests in ``completed`` (every row exited), each into its front end's outbox."""
        now_s = self._clock()
        observe_answer = self._scheduler.service.observe_answer
        pop_live, pop_internal = self._live.pop, self._by_internal.pop
        identity: bytes | None = None
        to: list[Finished] = []
        for live in completed:
            if live.identity != identity:  # one step's answers mostly go to a few front ends: looked up once
                identity = live.identity
                to = self._outbox_of(identity).finished
            admitted_s = live.admitted_s
            if live.predicted_answer_s >= MIN_PREDICTION_TO_LEARN_S:  # (else it teaches nothing: no call)
                observe_answer(live.predicted_answer_s, now_s - admitted_s)
            started_s = live.first_step_s if live.first_step_s is not None else now_s
            level = live.level
            to.append(
                Finished(
                    live.request_id,
                    live.outcomes,  # type: ignore[arg-type]  # every row has exited: no None is left
                    started_s - admitted_s,
                    now_s - started_s,
                    None if level is None else (level.criterion_code, level.speed, level.drop_pts),
                )
            )
            pop_live((identity, live.request_id), None)
            pop_internal(live.internal_id, None)  # its rows have all left the owner table

    def _fail(self, live: _Live, error: EngineError) -> None:
        self._reply_failed(live.identity, live.request_id, error)
        self._forget(live)

    def _reply_failed(self, identity: bytes, request_id: int, error: EngineError) -> None:
        failed = Failed(request_id=request_id, kind=type(error).__name__, message=error.public_message)
        if isinstance(error, QueueFullError):
            failed.retry_after_s, failed.reason = error.retry_after_s, error.reason
        self._outbox_of(identity).failed.append(failed)

    def _outbox_of(self, identity: bytes) -> Outputs:
        outputs = self._outbox.get(identity)
        if outputs is None:
            outputs = self._outbox[identity] = Outputs([], [])
        return outputs

    def _forget(self, live: _Live) -> None:
        self._live.pop((live.identity, live.request_id), None)
        self._by_internal.pop(live.internal_id, None)
        for row_id in live.row_ids:
            self._row_owner.pop(row_id, None)
        self._observer.inflight(len(self._live), len(self._row_owner))

    # --- start-up -----------------------------------------------------------------------------------

    def calibrate_step_cost(self) -> None:
        """Time a few layer steps of synthetic rows (1 to a full batch, short and long) so admission
        predicts from the first request on; this also warms the kernels up. About a second on a CPU."""
        m = self._manifest
        max_rows = self.config.max_batch_size
        lengths = sorted({min(16, m.max_seq_length), min(64, m.max_seq_length)})
        sizes = sorted({1, max(1, max_rows // 4), max_rows})
        token_id = int(self._runner.pad_token_id) + 1
        torch.set_grad_enabled(False)
        service = self._scheduler.service
        for num_tokens in lengths:
            for num_rows in sizes:
                num_rows = min(num_rows, max(1, self.config.max_batch_tokens // num_tokens))
                rows = tuple(
                    RowSpec(self._scheduler.next_id(), None, (token_id,) * num_tokens, 0, 0.0, m.num_layers)
                    for _ in range(num_rows)
                )
                for _ in range(2):
                    cohort_id = self._scheduler.next_id()
                    plan = StepPlan(self._scheduler.next_id(), 1, cohort_id, rows, {})
                    started_s = time.perf_counter()
                    output = self._runner.execute(plan)
                    service.observe_step(
                        num_rows * num_tokens, output.num_padded_tokens, time.perf_counter() - started_s
                    )
                    self._runner.reset()
        fixed_s, per_token_s = service.cost.coefficients()
        logger.info(
            "layer step cost: %.2f ms + %.2f us per padded token (admission predicts with it)",
            fixed_s * 1000.0,
            per_token_s * 1e6,
        )
