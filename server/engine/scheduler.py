"""The scheduler decides who runs which layer next. Pure Python: no torch, no fastapi, no prometheus_client.

Loop (after vLLM v1): ``schedule() -> StepPlan``, the runner executes it, ``update_from_output(plan,
output)`` records which rows left. Rows are grouped in *cohorts* by depth (number of layers done). A step
runs one layer for a set of rows that all sit at the same depth; rows that exit after it finish at once.

Batching modes:

* ``refill`` (layer-level continuous batching): while deeper cohorts are in flight, new rows start at
  layer 1, and every cohort at the same depth is merged into the step, so steps stay full as rows exit.
  The depth with the most rows runs next (ties: the deeper), unless some depth has been passed over
  ``max_skips`` times: then it runs, so no row starves.
* ``shrink``: a batch is admitted only when nothing is in flight, and runs until its last row exits.

Shadow rows (the live accuracy guard re-runs a sample of early exits to full depth) are lowest priority:
they never share a step with real rows, run only when no real row is runnable, are capped in number,
and waiting shadow rows are shed first when a full batch of real rows is queued. A real request arriving while
a shadow step computes waits for at most that one small step (``max_shadow_batch_size`` rows, one layer).

Admission is by time, not by count. A request is admitted only when the engine predicts it will be
answered in time: before its deadline, or, without one, with a queue wait under ``max_queue_wait_ms``.
The prediction (``server/engine/admission.py``) drains the rows ahead of it (waiting, and the remaining
layers of rows in flight) at the step cost the engine measured on its own recent steps, in cohorts sized
so that a row's own cohort takes at most half its deadline, then adds that cohort of its own. Rows then
run earliest deadline first. A refused request gets ``QueueFullError`` (429) at once, with
a ``Retry-After`` of the predicted backlog; a request that could not be answered in time even by an idle
engine gets ``DeadlineExceededError`` (504) at once. At dispatch a waiting row whose expected remaining
compute no longer fits before its deadline is dropped without being computed, and a row in flight is
dropped as soon as even one more step could not finish in time, so no compute goes to an answer that
would arrive late. ``max_queue_size`` still caps the queue's memory.

Why this design, among the field's answers to overload:

* A FIFO bounded by count (what this replaced; Triton's ``max_queue_size``) admits work whose deadline
  has already become unreachable: at 2x load, 1,024 queued rows were ~9 s of work, every admitted row
  expired mid-computation and goodput fell to 2 % of capacity.
* Triton's queue policy (per-request timeouts, REJECT on timeout) and CoDel (drop when the queue's
  sojourn time stays above a target for an interval) both act *after* a row has waited too long: the
  waiting was the waste, and a client learns of the refusal late. Early-exit rows have a service time
  the engine measures per layer step, so it can refuse *before* queueing, which is strictly cheaper.
  The ``max_queue_wait_ms`` bound for deadline-less requests is CoDel's target, enforced up front.
* Adaptive LIFO ("Fail at Scale") serves the newest requests first under overload so that some meet
  their deadline while old ones rot. With admission by time no row rots: every admitted row is
  predicted to finish, so FIFO stays fair and the tail stays bounded; LIFO would only reorder it.
* Envoy's adaptive concurrency infers a concurrency limit from latency gradients because a proxy
  cannot see its upstream's service time. This engine can, so it predicts instead of probing.

Layers count from 1: a row at depth d has run layers 1..d; its next step runs layer d + 1.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from operator import attrgetter

from server.engine.admission import (
    ADMISSION_MARGIN,
    Admitted,
    Backlog,
    DegradeLevel,
    ServiceModel,
    admit,
)
from server.engine.errors import QueueFullError
from server.engine.types import BatchingMode

# A deadline exit leaves this much before the deadline for the reply's way back (core -> front end -> HTTP).
DEADLINE_REPLY_SLACK_S = 0.005


# Per-row and per-step records (``RowSpec``, ``RowExit``, ``StepPlan``, ``StepOutput``, ``Decision``) are
# plain slotted dataclasses, not frozen ones: a frozen dataclass builds through ``object.__setattr__`` per
# field, 4x the cost (0.65 vs 0.16 us for a row; 1.8 vs 0.5 us for a plan), paid for every row of every
# step, or several times per step. Nothing mutates them; a changed setting is a ``replace``.
@dataclass(slots=True)
class RowSpec:
    """One input row as admitted: its tokens and its exit policy (native threshold, see criteria)."""

    row_id: int
    request_id: int | None  # None: a shadow row (the accuracy guard's re-run), owned by no request
    # From a front end an ``array('i')`` (``messages.unpack_token_ids``); any int sequence elsewhere.
    token_ids: Sequence[int]
    criterion_code: int
    threshold: float
    max_layers: int  # 1-based cap, already clamped to the model's depth
    deadline_s: float | None = None  # absolute, same clock as ``now_s``
    shadow: bool = False  # accuracy-guard re-run, not a client's row
    best_effort: bool = False  # at its deadline, answered from the deepest ramp computed (anytime)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


_token_ids = attrgetter("token_ids")


@dataclass(slots=True)
class StepPlan:
    """One layer step: which rows run layer ``layer`` and where their hidden states come from."""

    step_id: int
    layer: int
    out_cohort_id: int  # the cohort the survivors form (at depth ``layer``)
    new_rows: tuple[RowSpec, ...]  # depth-0 rows to embed first (only when layer == 1)
    sources: dict[int, tuple[int, ...]]  # cohort id -> row ids taken from it (all at depth layer - 1)
    dropped: dict[int, tuple[int, ...]] = field(default_factory=dict)  # cohort id -> rows to discard
    shadow: bool = False  # a step of shadow rows only
    keep_probs: bool = False  # report the survivors' probabilities too (best-effort rows are live)

    @property
    def row_ids(self) -> list[int]:
        return [r.row_id for r in self.new_rows] + [r for rows in self.sources.values() for r in rows]

    @property
    def num_rows(self) -> int:
        return len(self.new_rows) + sum(len(rows) for rows in self.sources.values())


@dataclass(slots=True)
class RowExit:
    """A row that left after this step's ramp."""

    row_id: int
    label_index: int
    probs: Sequence[float]  # a list from the runner (it goes into the reply as it is)
    exit_layer: int
    deadline_exit: bool = False  # answered at its deadline from the deepest ramp computed, not by policy


@dataclass(slots=True)
class StepOutput:
    """What the runner returns: the rows that exited; every other row of the plan survives in order."""

    exited: tuple[RowExit, ...]
    survivors: tuple[int, ...]  # row ids now in ``plan.out_cohort_id``
    num_padded_tokens: int = 0  # rows x padded length of the step (token budget accounting)
    num_real_tokens: int = 0  # the rows' own tokens (0: the scheduler sums them itself)
    survivor_probs: tuple[tuple[float, ...], ...] = ()  # with ``plan.keep_probs``: per survivor, in order
    survivors_longest: int = 0  # the most tokens of any survivor (0: not reported)


@dataclass(slots=True)
class Decision:
    """The result of one ``schedule`` call."""

    plan: StepPlan | None
    expired: tuple[RowSpec, ...] = ()  # rows dropped: their deadline passed or could no longer be met
    num_expired_in_flight: int = 0  # of those, rows that held hidden states (compute spent in vain)
    wake_at_s: float | None = None  # with no plan: when to call again at the latest (max_wait)
    # Best-effort rows answered now from their deepest ramp: their next layer would end after the deadline.
    deadline_exits: tuple[tuple[RowSpec, RowExit], ...] = ()


@dataclass
class _Cohort:
    cohort_id: int
    depth: int
    row_ids: list[int]
    shadow: bool = False
    longest: int = 0  # the most tokens of any of its rows, when known exactly (0: unknown)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 64
    max_batch_tokens: int = 16384
    max_wait_ms: float = 2.0
    max_queue_size: int = 1024  # rows waiting for admission
    mode: BatchingMode = BatchingMode.REFILL
    num_layers: int = 6
    max_skips: int = 2  # a depth with rows is passed over at most this many steps in a row
    # Rows holding hidden states. More rows in flight than one batch only add queueing inside the engine
    # unless a bigger batch is cheaper per row (GPUs): on the 2-core CPU, 4 x max_batch_size gave the same
    # throughput as shrink with a 2-5x worse p99 when saturated. None = max_batch_size.
    max_inflight_rows: int | None = None
    queue_full_retry_after_s: float = 1.0  # Retry-After when the count cap refuses
    # Deadline-less requests are refused when their predicted queue wait exceeds this; None = no bound.
    max_queue_wait_ms: float | None = 500.0
    # Deadline-less requests that allow degradation run faster settings when predicted to be answered
    # later than this; None = degrade only for deadlines.
    target_latency_ms: float | None = None
    max_shadow_rows: int = 64  # shadow rows waiting or in flight
    max_shadow_batch_size: int = 8


class Scheduler:
    """Owns row state and batching decisions. Not thread-safe: the worker serialises calls."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._max_skips = config.max_skips
        self._max_inflight_rows = config.max_inflight_rows or config.max_batch_size
        self._waiting: deque[RowSpec] = deque()
        self._shadow_waiting: deque[RowSpec] = deque()
        self.num_shadow_dropped = 0
        self._dropped_shadow_ids: list[int] = []
        self._arrival_s: dict[int, float] = {}
        self._rows: dict[int, RowSpec] = {}  # every live row, waiting or in a cohort
        self._cohorts: dict[int, _Cohort] = {}
        self._cancelled: set[int] = set()
        self._deadlines: list[
            tuple[float, int]
        ] = []  # min-heap of (deadline, row id)  # row ids to drop at the next step
        self._skips: dict[int, int] = {}  # depth -> times passed over while it had rows
        self._ids = itertools.count(1)
        self.service = ServiceModel(config.max_batch_size, config.max_batch_tokens)
        self._expected_layers: dict[int, float] = {}  # real row id -> layers it is expected to run
        self._waiting_backlog = Backlog()
        self._dispatch_expired: list[RowSpec] = []  # rows dropped at dispatch: could no longer finish
        self._computing: StepPlan | None = None  # the plan handed out and not yet reported back
        self._inflight_cached: tuple[Backlog, float] | None = None  # see ``_inflight_backlog``
        self._num_best_effort = 0  # live best-effort rows (steps then report survivors' probabilities)
        self._latest: dict[int, RowExit] = {}  # best-effort row in flight -> its deepest ramp's answer
        self._target_latency_s = (
            None if config.target_latency_ms is None else config.target_latency_ms / 1000.0
        )

    # --- admission and cancellation ---------------------------------------------------------------

    def add_rows(
        self, rows: list[RowSpec], now_s: float, levels: tuple[DegradeLevel, ...] = ()
    ) -> tuple[list[RowSpec], Admitted]:
        """Queue a request's rows, all or none, if they can be answered in time (see the module doc), at
        their own exit setting or, under overload, at the least degraded of ``levels`` that is
        (``admission.admit``). Returns the rows as queued (their setting may be degraded) and where they
        were admitted.

        Raises ``QueueFullError`` (over ``max_queue_size``, or predicted to miss its deadline or the
        queue-wait bound at every allowed level) or ``DeadlineExceededError`` (too much work for its
        deadline even when idle).
        """
        if len(self._waiting) + len(rows) > self.config.max_queue_size:
            raise QueueFullError(
                f"queue full ({len(self._waiting)} rows waiting, limit {self.config.max_queue_size})",
                retry_after_s=max(self.config.queue_full_retry_after_s, self.predicted_backlog_s()),
                reason="queue_full",
            )
        depth = self.service.depth
        first = rows[0]
        own = max(depth.expected_layers(r.criterion_code, r.threshold, r.max_layers) for r in rows)
        admitted = Admitted(0.0, None, own)
        prediction = self.service.prediction()
        if prediction.ready:
            admitted = admit(
                prediction,
                self._backlog(),
                len(rows),
                sum(r.num_tokens for r in rows) / len(rows),
                own,
                first.deadline_s,
                now_s,
                self.config.max_queue_wait_ms,
                levels=levels,
                level_layers=tuple(
                    depth.expected_layers(v.criterion_code, v.threshold, first.max_layers, v.mean_exit_layer)
                    for v in levels
                ),
                target_latency_s=self._target_latency_s,
                best_effort=first.best_effort,
                cut_wait_s=self._cut_wait_s(now_s) if first.best_effort and self._num_best_effort else None,
            )
        level = admitted.level
        if level is not None:
            rows = [replace(r, criterion_code=level.criterion_code, threshold=level.threshold) for r in rows]
        for row in rows:
            layers = admitted.expected_layers
            self._waiting.append(row)
            self._rows[row.row_id] = row
            self._arrival_s[row.row_id] = now_s
            self._expected_layers[row.row_id] = layers
            self._waiting_backlog = self._waiting_backlog.plus(layers, layers * row.num_tokens)
            if row.deadline_s is not None:
                heapq.heappush(self._deadlines, (row.deadline_s, row.row_id))
            if row.best_effort:
                self._num_best_effort += 1
        return rows, admitted

    def _cut_wait_s(self, now_s: float) -> float:
        """How long a new row can wait for its first layer at most when the best-effort rows ahead are
        cut at their deadlines: the work of the other rows ahead, or until the last of those deadlines.
        (Unstretched; ``admit`` applies the margin.)"""
        prediction = self.service.prediction()
        uncut, last_cut_s = Backlog(), now_s
        for row in self._waiting:
            layers = self._expected_layers.get(row.row_id, float(row.max_layers))
            if row.best_effort and row.deadline_s is not None:
                last_cut_s = max(last_cut_s, row.deadline_s)
            else:
                uncut = uncut.plus(layers, layers * row.num_tokens, layers)
        for row_id, depth in self._inflight_depths():
            live = self._rows.get(row_id)
            if live is None or depth >= live.max_layers:
                continue
            if live.best_effort and live.deadline_s is not None:
                last_cut_s = max(last_cut_s, live.deadline_s)
                continue
            remaining = max(1.0, self._expected_layers.get(row_id, live.max_layers) - depth)
            uncut = uncut.plus(remaining, remaining * live.num_tokens, remaining)
        return max(prediction.drain_s(uncut), last_cut_s - now_s)

    def backlog(self) -> Backlog:
        """Expected work of the rows waiting and in flight."""
        return self._backlog()

    def predicted_backlog_s(self) -> float:
        """Seconds until the rows waiting and in flight now are computed (0 before any step was timed)."""
        if not self.service.ready:
            return 0.0
        return self.service.correction * self.service.drain_s(self._backlog())

    def _backlog(self) -> Backlog:
        """Waiting rows' expected work plus that of the rows in flight."""
        return self._waiting_backlog + self._inflight_backlog()[0]

    def _inflight_backlog(self) -> tuple[Backlog, float]:
        """The expected remaining layers of real rows in flight (in a cohort, or in the step being
        computed), and the earliest of their deadlines (inf if none has one).

        Cached between steps: every request's admission asks for it, and the rows in flight change only
        in ``schedule``, ``update_from_output``, ``fail_step``, ``cancel_request`` and ``reset`` (each
        drops the cache), never by adding a request to the queue."""
        cached = self._inflight_cached
        if cached is None:
            cached = self._inflight_cached = self._sum_inflight()
        return cached

    def _sum_inflight(self) -> tuple[Backlog, float]:
        """``_inflight_backlog`` computed: summed as floats, one ``Backlog`` at the end."""
        rows, expected, cancelled = self._rows, self._expected_layers, self._cancelled
        row_layers = token_layers = chain_layers = 0.0
        earliest_s = math.inf
        for row_id, depth in self._inflight_depths():
            row = rows.get(row_id)
            if row is None or depth >= row.max_layers:
                continue
            remaining = expected.get(row_id, row.max_layers) - depth
            if remaining < 1.0:
                remaining = 1.0
            row_layers += remaining
            token_layers += remaining * len(row.token_ids)
            if remaining > chain_layers:
                chain_layers = remaining
            if row.deadline_s is not None and row.deadline_s < earliest_s and row_id not in cancelled:
                earliest_s = row.deadline_s
        return Backlog(row_layers, token_layers, chain_layers), earliest_s

    def _inflight_depths(self) -> Iterator[tuple[int, int]]:
        """(row id, layers done) of every real row holding hidden states."""
        for cohort in self._cohorts.values():
            if not cohort.shadow:
                depth = cohort.depth
                for row_id in cohort.row_ids:
                    yield row_id, depth
        plan = self._computing
        if plan is not None and not plan.shadow:
            for row in plan.new_rows:
                yield row.row_id, 0
            for rows in plan.sources.values():
                for row_id in rows:
                    yield row_id, plan.layer - 1

    def add_shadow_row(self, row: RowSpec) -> bool:
        """Queue a shadow row; False (and counted as dropped) when the shadow cap is reached."""
        num_shadow = len(self._shadow_waiting) + sum(
            len(c.row_ids) for c in self._cohorts.values() if c.shadow
        )
        if num_shadow >= self.config.max_shadow_rows:
            self.num_shadow_dropped += 1
            return False
        self._shadow_waiting.append(row)
        self._rows[row.row_id] = row
        return True

    def take_dropped_shadow_rows(self) -> list[int]:
        """Ids of shadow rows dropped under load since the last call (their owner forgets them)."""
        dropped, self._dropped_shadow_ids = self._dropped_shadow_ids, []
        return dropped

    def cancel_request(self, request_id: int) -> int:
        """Drop every row of a request: waiting rows now, in-flight rows before the next compute."""
        self._inflight_cached = None
        num_dropped = 0
        for row in [r for r in self._waiting if r.request_id == request_id]:
            self._waiting.remove(row)
            self._unqueued(row)
            self._forget(row.row_id)
            num_dropped += 1
        for row_id, row in self._rows.items():
            if row.request_id == request_id:
                self._cancelled.add(row_id)
                num_dropped += 1
        return num_dropped

    def next_id(self) -> int:
        """A fresh id for rows, requests, cohorts and steps."""
        return next(self._ids)

    # --- introspection ----------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_inflight_rows(self) -> int:
        """Real (non-shadow) rows holding hidden states."""
        return sum(len(c.row_ids) for c in self._cohorts.values() if not c.shadow)

    @property
    def num_shadow_rows(self) -> int:
        return len(self._shadow_waiting) + sum(len(c.row_ids) for c in self._cohorts.values() if c.shadow)

    def has_work(self) -> bool:
        return bool(self._waiting or self._shadow_waiting or self._cohorts)

    def cohort_depths(self, shadow: bool = False) -> dict[int, int]:
        """Depth -> number of rows in flight at that depth (real rows, or shadow rows)."""
        depths: dict[int, int] = {}
        for c in self._cohorts.values():
            if c.shadow == shadow:
                depths[c.depth] = depths.get(c.depth, 0) + len(c.row_ids)
        return depths

    # --- the decision -----------------------------------------------------------------------------

    def schedule(self, now_s: float) -> Decision:
        """Pick the next layer step, or say when to look again."""
        self._inflight_cached = None
        deadline_exits = self._take_deadline_exits(now_s) if self._latest else ()
        decision = self._decide(now_s)
        plan = decision.plan
        if plan is not None and self._num_best_effort and not plan.shadow:
            plan = replace(plan, keep_probs=True)
            decision = replace(decision, plan=plan)
        if deadline_exits:
            decision = replace(decision, deadline_exits=deadline_exits)
        self._computing = plan
        self._inflight_cached = None  # rows moved from their cohorts into the plan
        return decision

    def _take_deadline_exits(self, now_s: float) -> tuple[tuple[RowSpec, RowExit], ...]:
        """Best-effort rows in flight whose next layer would end after their deadline: answered now from
        the deepest ramp computed (they are dropped from their cohorts at this step's bookkeeping).

        Its next layer may wait behind one step of another depth, and no step holds more rows than are
        live (in flight or waiting) nor more than a batch: so a row leaves when its deadline is closer
        than two such steps (measured step cost per row and token, stretched by the admission margin and
        the learned correction)."""
        prediction = self.service.prediction()
        stretch = ADMISSION_MARGIN * prediction.correction if prediction.ready else 0.0
        num_live = self.num_inflight_rows + len(self._waiting)
        exits: list[tuple[RowSpec, RowExit]] = []
        for row_id, latest in self._latest.items():
            row = self._rows[row_id]
            assert row.deadline_s is not None
            num_rows = min(float(num_live), prediction.rows_per_step(row.num_tokens))
            step_s = prediction.step_s(num_rows, row.num_tokens)
            if now_s + DEADLINE_REPLY_SLACK_S + 2 * stretch * step_s > row.deadline_s:
                exits.append((row, replace(latest, deadline_exit=True)))
        for row, _ in exits:
            self._latest.pop(row.row_id)
            self._cancelled.add(row.row_id)
        return tuple(exits)

    def _decide(self, now_s: float) -> Decision:
        # A row whose deadline passes before even the cheapest step could finish is dropped now.
        # (Only a row with a deadline can expire: without one, no prediction is looked up.)
        horizon_s = self.service.step_s(1, 1) if self._deadlines and self.service.ready else 0.0
        expired = self._drop_expired(now_s + horizon_s)
        num_expired_in_flight = sum(1 for row in expired if row.row_id in self._cancelled)
        dropped = self._take_cancelled()
        # Under load (a full batch of real rows queued) waiting shadow rows are shed first. Below that they
        # stay queued (within max_shadow_rows) for the next idle gap: they never run while a real row is
        # runnable anyway, and shedding them at every queued real row cut 1 % sampling to ~0.4 % at 70 %
        # load.
        if len(self._waiting) >= self.config.max_batch_size and self._shadow_waiting:
            self.num_shadow_dropped += len(self._shadow_waiting)
            for row in self._shadow_waiting:
                self._forget(row.row_id)
                self._dropped_shadow_ids.append(row.row_id)
            self._shadow_waiting.clear()
        starting = self._rows_to_start(now_s)
        if self._dispatch_expired:
            expired += tuple(self._dispatch_expired)
            self._dispatch_expired.clear()
        groups = self.cohort_depths()
        if starting:
            groups[0] = len(starting)
        if not groups:
            shadow_groups = self._shadow_groups()
            if shadow_groups:
                depth = max(shadow_groups, key=lambda d: (shadow_groups[d], d))
                return Decision(self._plan_shadow(depth, dropped), expired, num_expired_in_flight)
            if dropped:  # nothing left to run, but the runner must still forget the dropped rows
                for cohort_id in dropped:
                    self._cohorts.pop(cohort_id, None)
                return Decision(self._drop_only_plan(dropped), expired, num_expired_in_flight)
            return Decision(None, expired, num_expired_in_flight)
        depth = self._pick_depth(groups, self._earliest_deadlines(starting))
        if depth == 0 and self.num_inflight_rows == 0:
            wake_at_s = self._admission_wait_until(now_s)
            if wake_at_s is not None and not dropped:
                return Decision(None, expired, num_expired_in_flight, wake_at_s)
        if depth == 0:
            self._start(starting)
            plan = StepPlan(self.next_id(), 1, self.next_id(), tuple(starting), {}, dropped)
        else:
            plan = self._plan_depth(depth, dropped)
        for other in groups:
            self._skips[other] = 0 if other == depth else self._skips.get(other, 0) + 1
        return Decision(plan, expired, num_expired_in_flight)

    def update_from_output(
        self, plan: StepPlan, output: StepOutput, duration_s: float | None = None
    ) -> list[tuple[RowSpec, RowExit]]:
        """Record a step's result (and, given ``duration_s``, its cost); returns the finished rows."""
        self._computing = None
        self._inflight_cached = None
        if duration_s is not None and plan.layer > 0 and plan.num_rows > 0:
            num_real_tokens = output.num_real_tokens or sum(r.num_tokens for r in plan.new_rows) + sum(
                self._rows[r].num_tokens for rows in plan.sources.values() for r in rows if r in self._rows
            )
            self.service.observe_step(
                num_real_tokens, output.num_padded_tokens or num_real_tokens, duration_s
            )
        finished: list[tuple[RowSpec, RowExit]] = []
        append = finished.append
        pop_row, pop_expected, cancelled = self._rows.pop, self._expected_layers.pop, self._cancelled
        # Exit counts per (policy, exit layer), for the depth table. One step's rows mostly share a policy
        # and an exit layer: counted by runs, so a key is built and hashed per run, not per row.
        exits_by_policy: dict[tuple[int, float, int, int], int] = {}
        code, threshold, max_layers, layer, run = -1, -1.0, -1, -1, 0
        for row_exit in output.exited:  # what ``_forget`` does, inline: this runs for every row
            row_id = row_exit.row_id
            row = pop_row(row_id, None)
            if row is None:
                continue
            append((row, row_exit))
            if not row.shadow:
                if (
                    row_exit.exit_layer != layer
                    or row.criterion_code != code
                    or row.threshold != threshold
                    or row.max_layers != max_layers
                ):
                    if run:
                        key = (code, threshold, max_layers, layer)
                        exits_by_policy[key] = exits_by_policy.get(key, 0) + run
                    code, threshold, max_layers, layer, run = (
                        row.criterion_code, row.threshold, row.max_layers, row_exit.exit_layer, 0
                    )  # fmt: skip
                run += 1
            if row.best_effort:
                self._num_best_effort -= 1
                self._latest.pop(row_id, None)
            pop_expected(row_id, None)  # (its arrival went when it started)
            if cancelled:
                cancelled.discard(row_id)
        if run:
            key = (code, threshold, max_layers, layer)
            exits_by_policy[key] = exits_by_policy.get(key, 0) + run
        for policy_exit, num_rows in exits_by_policy.items():
            self.service.depth.observe(*policy_exit, num_rows)
        if output.survivor_probs:
            self._keep_latest(plan.layer, output)
        survivors = [r for r in output.survivors if r in self._rows]
        if survivors:
            longest = output.survivors_longest if len(survivors) == len(output.survivors) else 0
            self._cohorts[plan.out_cohort_id] = _Cohort(
                plan.out_cohort_id, plan.layer, survivors, plan.shadow, longest
            )
        return finished

    def _keep_latest(self, layer: int, output: StepOutput) -> None:
        """Best-effort survivors: their deepest ramp's answer so far (given if the deadline comes first)."""
        rows = self._rows
        for row_id, probs in zip(output.survivors, output.survivor_probs, strict=True):
            row = rows.get(row_id)
            if row is not None and row.best_effort and row.deadline_s is not None:
                label_index = max(range(len(probs)), key=probs.__getitem__)
                self._latest[row_id] = RowExit(row_id, label_index, probs, layer)

    def fail_step(self, plan: StepPlan) -> tuple[set[int], list[int]]:
        """The runner raised on ``plan``: forget its rows. Returns the request ids that must fail (every
        row of theirs is dropped) and the ids of the step's shadow rows (no request fails for those)."""
        self._computing = None
        self._inflight_cached = None
        failed: set[int] = set()
        shadow_ids: list[int] = []
        for row_id in plan.row_ids:
            row = self._rows.get(row_id)
            if row is not None and row.request_id is not None:
                failed.add(row.request_id)
            elif row is not None:
                shadow_ids.append(row_id)
            self._forget(row_id)
        for request_id in failed:
            self.cancel_request(request_id)
        return failed, shadow_ids

    def reset(self) -> set[int]:
        """Forget everything (engine restart); returns the request ids that were live."""
        request_ids = {r.request_id for r in self._rows.values() if r.request_id is not None}
        self._waiting.clear()
        self._waiting_backlog = Backlog()
        self._expected_layers.clear()
        self._dispatch_expired.clear()
        self._computing = None
        self._inflight_cached = None
        self._shadow_waiting.clear()
        self._rows.clear()
        self._arrival_s.clear()
        self._cohorts.clear()
        self._cancelled.clear()
        self._deadlines.clear()
        self._latest.clear()
        self._num_best_effort = 0
        self._skips.clear()
        return request_ids

    # --- helpers ----------------------------------------------------------------------------------

    def _forget(self, row_id: int) -> None:
        row = self._rows.pop(row_id, None)
        if row is not None and row.best_effort:
            self._num_best_effort -= 1
            self._latest.pop(row_id, None)
        self._arrival_s.pop(row_id, None)
        self._expected_layers.pop(row_id, None)
        self._cancelled.discard(row_id)

    def _start(self, starting: list[RowSpec]) -> None:
        """The queue's head (``starting``, in order) leaves the queue for layer 1: one backlog update for
        all of them, not one per row."""
        waiting, expected, arrival = self._waiting, self._expected_layers, self._arrival_s
        if len(starting) == len(waiting):  # the whole queue starts: nothing waits, nothing is left to sum
            waiting.clear()
            arrival.clear()  # (only waiting rows have one)
            self._waiting_backlog = Backlog()
            return
        row_layers = token_layers = 0.0
        for row in starting:
            waiting.popleft()
            arrival.pop(row.row_id, None)  # only a waiting row's arrival is read (max_wait)
            layers = expected.get(row.row_id, float(row.max_layers))
            row_layers += layers
            token_layers += layers * len(row.token_ids)
        if not waiting:  # no drift from float sums: an empty queue holds no work
            self._waiting_backlog = Backlog()
        else:
            self._waiting_backlog = self._waiting_backlog.plus(-row_layers, -token_layers)

    def _unqueued(self, row: RowSpec) -> None:
        """A row left the waiting queue (started, cancelled or expired): its work is no longer ahead."""
        layers = self._expected_layers.get(row.row_id, float(row.max_layers))
        backlog = self._waiting_backlog.plus(-layers, -layers * row.num_tokens)
        if not self._waiting:  # no drift from float sums: an empty queue holds no work
            backlog = Backlog()
        self._waiting_backlog = backlog

    def _drop_expired(self, now_s: float) -> tuple[RowSpec, ...]:
        # A heap of deadlines, not a scan of every live row: this runs once per layer step.
        if len(self._deadlines) > 4 * len(self._rows) + 64:  # rows that finished long before their deadline
            self._deadlines = [
                (r.deadline_s, r.row_id) for r in self._rows.values() if r.deadline_s is not None
            ]
            heapq.heapify(self._deadlines)
        expired: list[RowSpec] = []
        while self._deadlines and self._deadlines[0][0] <= now_s:
            _, row_id = heapq.heappop(self._deadlines)
            row = self._rows.get(row_id)
            if row is not None and row_id not in self._cancelled:  # else finished or already dropped
                expired.append(row)
        for row in expired:
            if row in self._waiting:
                self._waiting.remove(row)
                self._unqueued(row)
                self._forget(row.row_id)
            else:
                self._cancelled.add(row.row_id)
        return tuple(expired)

    def _take_cancelled(self) -> dict[int, tuple[int, ...]]:
        """Remove cancelled rows from their cohorts; returns cohort id -> removed row ids."""
        dropped: dict[int, tuple[int, ...]] = {}
        if not self._cancelled:
            return dropped
        for cohort in list(self._cohorts.values()):
            gone = tuple(r for r in cohort.row_ids if r in self._cancelled)
            if gone:
                dropped[cohort.cohort_id] = gone
                cohort.row_ids = [r for r in cohort.row_ids if r not in self._cancelled]
                cohort.longest = 0
                if not cohort.row_ids:
                    del self._cohorts[cohort.cohort_id]
        for row_id in list(self._cancelled):
            self._forget(row_id)
        return dropped

    def _admission_room(self) -> int:
        """How many waiting rows may start now."""
        if self.config.mode is BatchingMode.SHRINK:
            return self.config.max_batch_size if self.num_inflight_rows == 0 else 0
        return max(0, self._max_inflight_rows - self.num_inflight_rows)

    def _shadow_groups(self) -> dict[int, int]:
        groups = self.cohort_depths(shadow=True)
        if self._shadow_waiting:
            groups[0] = len(self._shadow_waiting)
        return groups

    def _plan_shadow(self, depth: int, dropped: dict[int, tuple[int, ...]]) -> StepPlan:
        """A small step of shadow rows only."""
        limit = self.config.max_shadow_batch_size
        if depth == 0:
            rows = tuple(self._shadow_waiting.popleft() for _ in range(min(limit, len(self._shadow_waiting))))
            return StepPlan(self.next_id(), 1, self.next_id(), rows, {}, dropped, shadow=True)
        sources: dict[int, tuple[int, ...]] = {}
        num_rows = 0
        for cohort in sorted(self._cohorts.values(), key=lambda c: c.cohort_id):
            if not cohort.shadow or cohort.depth != depth or num_rows >= limit:
                continue
            taken = tuple(cohort.row_ids[: limit - num_rows])
            sources[cohort.cohort_id] = taken
            num_rows += len(taken)
            cohort.row_ids, cohort.longest = cohort.row_ids[len(taken) :], 0
            if not cohort.row_ids:
                del self._cohorts[cohort.cohort_id]
        return StepPlan(self.next_id(), depth + 1, self.next_id(), (), sources, dropped, shadow=True)

    def _pick_depth(self, groups: dict[int, int], earliest_s: dict[int, float]) -> int:
        """The depth to run next: the one holding the earliest deadline (earliest deadline first, the
        order that meets the most deadlines on one machine), else the one with the most rows. A depth
        in flight passed over ``max_skips`` times runs regardless, so rows without a deadline progress.
        """
        if len(groups) == 1:  # one depth runnable (most steps of a deep batch): whichever rule, it runs
            return next(iter(groups))
        # Only rows holding hidden states can starve; waiting rows start once theirs is the earliest
        # deadline or the biggest group (groups in flight only shrink).
        starving = [d for d in groups if d > 0 and self._skips.get(d, 0) >= self._max_skips]
        if starving:
            return max(starving, key=lambda d: (self._skips.get(d, 0), d))
        if earliest_s:
            return min(groups, key=lambda d: (earliest_s.get(d, math.inf), -groups[d], -d))
        return max(groups, key=lambda d: (min(groups[d], self.config.max_batch_size), d))

    def _earliest_deadlines(self, starting: list[RowSpec]) -> dict[int, float]:
        """Depth -> the earliest deadline among its runnable rows (depths without deadlines left out)."""
        earliest: dict[int, float] = {}
        if not self._deadlines:  # every live row with a deadline is in the heap: none has one
            return earliest
        for cohort in self._cohorts.values():
            if cohort.shadow:
                continue
            for row_id in cohort.row_ids:
                row = self._rows.get(row_id)
                if row is not None and row.deadline_s is not None:
                    earliest[cohort.depth] = min(earliest.get(cohort.depth, math.inf), row.deadline_s)
        for row in starting:
            if row.deadline_s is not None:
                earliest[0] = min(earliest.get(0, math.inf), row.deadline_s)
        return earliest

    def _admission_wait_until(self, now_s: float) -> float | None:
        """With an idle engine, a small batch waits up to max_wait_ms for company."""
        if len(self._waiting) >= self.config.max_batch_size:
            return None
        oldest_s = self._arrival_s[self._waiting[0].row_id]
        deadline_s = oldest_s + self.config.max_wait_ms / 1000.0
        return deadline_s if deadline_s > now_s else None

    def _fits(self, num_rows: int, longest: int) -> bool:
        return num_rows <= self.config.max_batch_size and num_rows * longest <= self.config.max_batch_tokens

    def _plan_depth(self, depth: int, dropped: dict[int, tuple[int, ...]]) -> StepPlan:
        """The next layer for rows in flight at ``depth`` (>= 1), oldest cohorts first."""
        out_cohort_id = self.next_id()
        sources: dict[int, tuple[int, ...]] = {}
        num_rows, longest = 0, 0
        # Oldest cohorts first, so a cohort split by the batch caps keeps its older rows moving.
        cohorts = self._cohorts
        ordered = (
            cohorts.values() if len(cohorts) == 1 else sorted(cohorts.values(), key=lambda c: c.cohort_id)
        )
        for cohort in list(ordered):  # (a list: whole cohorts leave the dict as they are taken)
            if cohort.depth != depth or cohort.shadow:
                continue
            whole = max(longest, cohort.longest)
            if cohort.longest and self._fits(num_rows + len(cohort.row_ids), whole):
                # Every row fits (what the loop below would find, row by row): the cohort goes whole.
                sources[cohort.cohort_id] = tuple(cohort.row_ids)
                num_rows, longest = num_rows + len(cohort.row_ids), whole
                del self._cohorts[cohort.cohort_id]
                continue
            taken: list[int] = []
            for row_id in cohort.row_ids:
                grown = max(longest, self._rows[row_id].num_tokens)
                if num_rows and not self._fits(num_rows + 1, grown):
                    break
                taken.append(row_id)
                num_rows, longest = num_rows + 1, grown
            if taken:
                sources[cohort.cohort_id] = tuple(taken)
                cohort.row_ids, cohort.longest = cohort.row_ids[len(taken) :], 0
                if not cohort.row_ids:
                    del self._cohorts[cohort.cohort_id]
            if cohort.row_ids:
                break  # the caps stopped us inside this cohort
        return StepPlan(self.next_id(), depth + 1, out_cohort_id, (), sources, dropped)

    def _rows_to_start(self, now_s: float) -> list[RowSpec]:
        """The waiting rows that may start at layer 1 now: the queue's head, within the batch and
        in-flight caps. Not removed from the queue: that happens if this depth is chosen.

        With step costs measured, a row starts only if everything in flight plus it is predicted (with
        the admission margin) to be computed before its deadline (else it can never be answered in
        time: dropped here, no compute spent) and before the earliest deadline of the rows already in
        flight (else it waits: starting it would make them late). The head of the queue competes with
        the depths in flight only with the rows that can really start: trickling rows into many small
        cohorts pays every step's fixed cost for few rows (a third of the throughput at 2x load on the
        2-core CPU).
        """
        if not self._waiting:
            return []
        room = self._admission_room()
        if room <= 0:
            return []
        if not self._deadlines:  # no live row has a deadline: the queue's head starts, within the caps
            return self._head_within_caps(room)
        prediction = self.service.prediction()
        timed = prediction.ready
        inflight, earliest_s = self._inflight_backlog() if timed else (Backlog(), math.inf)
        stretch = ADMISSION_MARGIN * prediction.correction
        starting: list[RowSpec] = []
        doomed: list[RowSpec] = []
        longest = 0
        for candidate in self._waiting:
            if len(starting) >= room:
                break
            grown = max(longest, candidate.num_tokens)
            if starting and not self._fits(len(starting) + 1, grown):
                break
            # Without any deadline in sight no prediction can hold a row back (the common case).
            if timed and (candidate.deadline_s is not None or earliest_s != math.inf):
                layers = self._expected_layers.get(candidate.row_id, float(candidate.max_layers))
                if candidate.best_effort:  # one layer in time is an answer
                    layers = 1.0
                with_it = inflight + Backlog.of_rows(1, layers, candidate.num_tokens)
                finish_s = now_s + stretch * prediction.drain_s(with_it)
                if candidate.deadline_s is not None and finish_s > candidate.deadline_s:
                    doomed.append(candidate)
                    continue
                if finish_s > earliest_s and (starting or inflight.row_layers > 0):
                    break
                inflight = with_it
                if candidate.deadline_s is not None:
                    earliest_s = min(earliest_s, candidate.deadline_s)
            starting.append(candidate)
            longest = grown
        for row in doomed:
            self._waiting.remove(row)
            self._unqueued(row)
            self._cancelled.add(row.row_id)  # forgotten at the next step's bookkeeping
            self._dispatch_expired.append(row)
        return starting

    def _head_within_caps(self, room: int) -> list[RowSpec]:
        """The longest head of the queue that fits ``room`` rows and the batch caps."""
        max_rows = min(room, self.config.max_batch_size)
        max_tokens = self.config.max_batch_tokens
        head = list(itertools.islice(self._waiting, max_rows))
        if len(head) * max(map(len, map(_token_ids, head))) <= max_tokens:  # (the common case) all fit
            return head
        starting: list[RowSpec] = []
        longest = 0
        # ``_fits`` inline (this runs for every row that starts): the row count is within the batch cap
        # by ``max_rows``, so only the padded tokens are checked.
        for num_rows, candidate in enumerate(head, start=1):
            n = len(candidate.token_ids)
            grown = longest if longest >= n else n
            if num_rows > 1 and num_rows * grown > max_tokens:
                break
            starting.append(candidate)
            longest = grown
        return starting

    def _drop_only_plan(self, dropped: dict[int, tuple[int, ...]]) -> StepPlan:
        return StepPlan(self.next_id(), 0, self.next_id(), (), {}, dropped)
