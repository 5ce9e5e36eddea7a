"""Admission by time: what a layer step costs, how deep rows go, and when a request would be answered.

Pure Python (no torch, fastapi or prometheus_client): the scheduler owns one :class:`ServiceModel` and
asks it, for every request it is offered, when that request would be answered given the rows already
ahead of it. The scheduler's docstring says why admission works this way; this module only measures and
predicts.

* **Step cost.** A layer step's wall time is fitted as ``fixed_s + per_token_s * padded_tokens`` by
  exponentially weighted least squares over the recent steps (a few dozen). Both terms matter: on a CPU
  the per-token term dominates, on a GPU a step below ~64 rows is launch-bound (the fixed term).
* **Steps.** A backlog drains in steps as full as the caps allow (``max_batch_size`` rows, the token
  budget), and takes at least as many steps as its longest chain of layers. (Learning rows per step
  from the steps seen under load was tried and fed back on itself: a fragmented schedule predicted big
  cohorts to be slow, so only small ones were started.)
* **Depth.** How many layers a row runs depends on its exit policy; the mean exit layer is learned per
  (criterion, threshold, max_layers) from the rows that finished. Unknown policies count as full depth,
  so a prediction errs towards refusing, never towards admitting a request that cannot be answered.
* **Correction.** The ratio of measured to predicted answer time of admitted requests (EWMA, missed
  deadlines included) scales every prediction when it is above 1: what the step model does not see
  (the front end's work competing for the interpreter, the order the scheduler really runs depths in)
  is measured instead of modelled. Below 1 it is ignored: a model that is pessimistic on average still
  has a tail, and letting the mean shrink the margin turned 3 % of requests into late 504s at 1.5x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.engine.errors import DeadlineExceededError, EngineError, QueueFullError

MIN_STEPS_FOR_FIT = 4  # before this many steps the engine has no cost estimate and admits by count only
MAX_POLICIES = 256  # (criterion, threshold, max_layers) keys whose depth is learned; others: full depth
MIN_PREDICTION_TO_LEARN_S = 0.05
# Admission refuses when the predicted answer, stretched by this factor, would be late: step costs on a
# shared machine wander, and a request refused at once costs less than one dropped after queueing.
ADMISSION_MARGIN = 1.1
MIN_CORRECTION, MAX_CORRECTION = 1.0, 3.0  # the step model is trusted as a lower bound only
COHORT_SHARE = 0.5  # of a deadline's budget, for the cohort a row runs in (see ServiceModel.cohort_rows)


# Backlog and Admitted are built several times per request (the front end's admission check and the
# core's): slotted, not frozen, as the per-row records (a frozen dataclass builds through
# ``object.__setattr__`` per field: 0.46 vs 0.14 us for a Backlog, timed on the class itself). Nothing
# mutates them: every change builds a new one.
@dataclass(slots=True)
class Backlog:
    """Work queued or in flight: row-layers (one row through one layer), token-layers, and the longest
    chain of layers one row still needs (steps run one layer, so the work takes at least that many)."""

    row_layers: float = 0.0
    token_layers: float = 0.0
    chain_layers: float = 0.0

    def plus(self, row_layers: float, token_layers: float, chain_layers: float = 0.0) -> Backlog:
        return Backlog(
            self.row_layers + row_layers,
            self.token_layers + token_layers,
            max(self.chain_layers, chain_layers),
        )

    @staticmethod
    def of_rows(num_rows: int, layers: float, mean_tokens_per_row: float) -> Backlog:
        """``num_rows`` rows that each need ``layers`` more layers."""
        return Backlog(num_rows * layers, num_rows * layers * mean_tokens_per_row, layers)

    def __add__(self, other: Backlog) -> Backlog:
        return self.plus(other.row_layers, other.token_layers, other.chain_layers)


class StepCostModel:
    """``step_s(padded_tokens)`` fitted on recent steps (exponentially weighted least squares)."""

    def __init__(self, decay: float = 0.97) -> None:
        self._decay = decay
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self.num_steps = 0

    def observe(self, num_padded_tokens: int, duration_s: float) -> None:
        d = self._decay
        x, y = float(num_padded_tokens), duration_s
        self._w = d * self._w + 1.0
        self._x = d * self._x + x
        self._y = d * self._y + y
        self._xx = d * self._xx + x * x
        self._xy = d * self._xy + x * y
        self.num_steps += 1

    @property
    def ready(self) -> bool:
        return self.num_steps >= MIN_STEPS_FOR_FIT

    def coefficients(self) -> tuple[float, float]:
        """(fixed_s, per_token_s), both >= 0. Steps all of one size fit a line through the origin."""
        if self._w == 0.0 or self._x == 0.0:
            return (self._y / self._w if self._w else 0.0), 0.0
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var_x = self._xx / self._w - mean_x * mean_x
        if var_x <= 1e-9 * mean_x * mean_x:
            return 0.0, mean_y / mean_x
        slope = (self._xy / self._w - mean_x * mean_y) / var_x
        intercept = mean_y - slope * mean_x
        if slope < 0.0:  # noise: no evidence that size matters; charge the mean step
            return mean_y, 0.0
        if intercept < 0.0:
            return 0.0, mean_y / mean_x
        return intercept, slope

    def step_s(self, num_padded_tokens: float) -> float:
        fixed_s, per_token_s = self.coefficients()
        return fixed_s + per_token_s * num_padded_tokens


class DepthModel:
    """Mean number of layers a row runs, per exit policy, learned from finished rows."""

    def __init__(self, alpha: float = 0.05) -> None:
        self._alpha = alpha
        self._mean: dict[tuple[int, float, int], float] = {}

    @staticmethod
    def _key(criterion_code: int, threshold: float, max_layers: int) -> tuple[int, float, int]:
        return criterion_code, round(threshold, 3), max_layers

    def expected_layers(
        self, criterion_code: int, threshold: float, max_layers: int, prior: float | None = None
    ) -> float:
        """The learned mean; before any row of this policy finished, ``prior`` (a calibrated mean exit
        layer) or else full depth."""
        mean = self._mean.get(self._key(criterion_code, threshold, max_layers))
        if mean is not None:
            return mean
        return float(max_layers) if prior is None else min(float(max_layers), prior)

    def entries(self) -> list[tuple[int, float, int, float]]:
        """(criterion code, threshold, max layers, mean layers run) per learned policy."""
        return [(*key, mean) for key, mean in self._mean.items()]

    def load(self, entries: list[tuple[int, float, int, float]]) -> None:
        """Replace what was learned with ``entries`` (a front end's copy of the core's table)."""
        self._mean = {(code, threshold, max_layers): mean for code, threshold, max_layers, mean in entries}

    def observe(
        self, criterion_code: int, threshold: float, max_layers: int, num_layers_run: int, num_rows: int = 1
    ) -> None:
        """``num_rows`` rows of this policy ran ``num_layers_run`` layers: the same mean as observing
        each in turn (the first sets it, each further one moves it by ``alpha``)."""
        key = self._key(criterion_code, threshold, max_layers)
        mean = self._mean.get(key)
        if mean is None:
            if len(self._mean) >= MAX_POLICIES:
                return
            mean, num_rows = float(num_layers_run), num_rows - 1
        if num_rows > 0:
            mean += (1.0 - (1.0 - self._alpha) ** num_rows) * (num_layers_run - mean)
        self._mean[key] = mean


@dataclass(frozen=True)
class ServicePrediction:
    """What the service model predicts with, frozen: the core sends it to the front ends with every
    output, so they refuse what the core would refuse without waiting for the core to read its inbox."""

    ready: bool = False
    fixed_s: float = 0.0
    per_token_s: float = 0.0
    pad_ratio: float = 1.0
    correction: float = MIN_CORRECTION
    max_rows_per_step: int = 1
    max_tokens_per_step: int = 1

    def rows_per_step(self, mean_tokens_per_row: float) -> float:
        """Rows one step serves while a backlog drains."""
        by_tokens = self.max_tokens_per_step / max(1.0, mean_tokens_per_row * self.pad_ratio)
        return max(1.0, min(float(self.max_rows_per_step), by_tokens))

    def cohort_rows(self, budget_s: float, layers: float, mean_tokens_per_row: float) -> float:
        """How many rows a cohort may hold so that its ``layers`` steps take ``COHORT_SHARE`` of
        ``budget_s``: the rest of the budget is for waiting behind the cohort ahead. (Cohorts sized by a
        deadline: fewer rows per step make every step pay its fixed cost for fewer rows; more make the
        first rows of the queue wait past their deadline. Measured at 2x load on the 2-core CPU, queues
        admitted without this slack left a third of the throughput in 2-row steps.)"""
        per_row_s = self.per_token_s * mean_tokens_per_row * self.pad_ratio
        step_budget_s = COHORT_SHARE * budget_s / max(1.0, layers) - self.fixed_s
        if per_row_s <= 0.0:
            return self.rows_per_step(mean_tokens_per_row)
        return max(1.0, min(self.rows_per_step(mean_tokens_per_row), step_budget_s / per_row_s))

    def drain_s(self, backlog: Backlog, rows_per_step: float | None = None) -> float:
        """Seconds until the engine has computed ``backlog``, in steps of ``rows_per_step`` rows (default:
        as full as the caps allow)."""
        if backlog.row_layers <= 0.0:
            return 0.0
        if rows_per_step is None:
            rows_per_step = self.rows_per_step(backlog.token_layers / backlog.row_layers)
        num_steps = max(backlog.row_layers / rows_per_step, backlog.chain_layers)
        return num_steps * self.fixed_s + self.per_token_s * backlog.token_layers * self.pad_ratio

    def step_s(self, num_rows: float, mean_tokens_per_row: float) -> float:
        """One layer step of ``num_rows`` rows of ``mean_tokens_per_row`` tokens."""
        return self.fixed_s + self.per_token_s * num_rows * mean_tokens_per_row * self.pad_ratio


def check_admission(
    prediction: ServicePrediction,
    ahead: Backlog,
    num_rows: int,
    mean_tokens_per_row: float,
    expected_layers: float,
    deadline_s: float | None,
    now_s: float,
    max_queue_wait_ms: float | None,
) -> float:
    """Refuse a request that would not be answered in time behind ``ahead``; else the predicted seconds
    until its answer (unstretched by the margin; 0 before any step was timed).

    Raises ``QueueFullError`` (predicted to miss its deadline, or the queue-wait bound) or
    ``DeadlineExceededError`` (too much work for its deadline even on an idle engine).
    """
    p = prediction
    if not p.ready:
        return 0.0
    scale = p.correction
    own = Backlog.of_rows(num_rows, expected_layers, mean_tokens_per_row)
    predicted_s = scale * p.drain_s(ahead + own)
    wait_s = ADMISSION_MARGIN * scale * p.drain_s(ahead)
    if deadline_s is not None:
        budget_s = deadline_s - now_s
        alone_s = scale * p.drain_s(own)
        if alone_s > budget_s:
            raise DeadlineExceededError(
                f"the request needs about {alone_s * 1000:.0f} ms of compute, more than its deadline "
                f"leaves ({max(0.0, budget_s) * 1000:.0f} ms)"
            )
        # Queued behind the rows ahead, in cohorts sized to the deadline; then a whole cohort of its
        # own: its rows share every step with the cohort's others.
        cohort = p.cohort_rows(budget_s, expected_layers, mean_tokens_per_row)
        own_cohort = Backlog.of_rows(max(num_rows, math.ceil(cohort)), expected_layers, mean_tokens_per_row)
        predicted_s = scale * (p.drain_s(ahead, rows_per_step=cohort) + p.drain_s(own_cohort, cohort))
        if ADMISSION_MARGIN * predicted_s > budget_s:
            raise QueueFullError(
                f"overloaded: predicted answer in {predicted_s * 1000:.0f} ms, after the deadline "
                f"({budget_s * 1000:.0f} ms left)",
                retry_after_s=wait_s,
                reason="deadline",
            )
        return predicted_s
    if max_queue_wait_ms is not None and wait_s * 1000.0 > max_queue_wait_ms:
        raise QueueFullError(
            f"overloaded: predicted queue wait {wait_s * 1000:.0f} ms exceeds {max_queue_wait_ms:.0f} ms",
            retry_after_s=wait_s,
            reason="queue_wait",
        )
    return predicted_s


class ServiceModel:
    """Predicts how long work takes on this engine, from what its steps measured."""

    def __init__(self, max_rows_per_step: int, max_tokens_per_step: int) -> None:
        self.cost = StepCostModel()
        self.depth = DepthModel()
        self._max_rows_per_step = max_rows_per_step
        self._max_tokens_per_step = max_tokens_per_step
        self._pad_ratio = 1.0  # EWMA of padded / real tokens per step
        # EWMA of (measured / predicted) answer time of admitted requests: what the step model misses
        # (front-end work competing for the interpreter, the order steps really run in) is learned here.
        self.correction = MIN_CORRECTION
        self._prediction: ServicePrediction | None = None

    @property
    def ready(self) -> bool:
        return self.cost.ready

    def observe_step(self, num_real_tokens: int, num_padded_tokens: int, duration_s: float) -> None:
        """One layer step ran in ``duration_s``."""
        self._prediction = None
        self.cost.observe(num_padded_tokens, duration_s)
        if num_real_tokens > 0 and num_padded_tokens >= num_real_tokens:
            self._pad_ratio += 0.05 * (num_padded_tokens / num_real_tokens - self._pad_ratio)

    def observe_answer(self, predicted_s: float, measured_s: float) -> None:
        """An admitted request was answered ``measured_s`` after admission; ``predicted_s`` was foreseen.
        Only predictions of real queueing teach: a lone request's few milliseconds are mostly noise."""
        if predicted_s < MIN_PREDICTION_TO_LEARN_S:
            return
        ratio = min(MAX_CORRECTION, max(MIN_CORRECTION, measured_s / predicted_s))
        self.correction += 0.05 * (ratio - self.correction)
        self._prediction = None

    def prediction(self) -> ServicePrediction:
        """The model's current coefficients, frozen; cached until the next step or answer is observed
        (admission asks for it once per request and per waiting row)."""
        if self._prediction is None:
            self._prediction = self._predict()
        return self._prediction

    def _predict(self) -> ServicePrediction:
        fixed_s, per_token_s = self.cost.coefficients()
        return ServicePrediction(
            ready=self.ready,
            fixed_s=fixed_s,
            per_token_s=per_token_s,
            pad_ratio=self._pad_ratio,
            correction=self.correction,
            max_rows_per_step=self._max_rows_per_step,
            max_tokens_per_step=self._max_tokens_per_step,
        )

    def rows_per_step(self, mean_tokens_per_row: float) -> float:
        return self.prediction().rows_per_step(mean_tokens_per_row)

    def cohort_rows(self, budget_s: float, layers: float, mean_tokens_per_row: float) -> float:
        return self.prediction().cohort_rows(budget_s, layers, mean_tokens_per_row)

    def drain_s(self, backlog: Backlog, rows_per_step: float | None = None) -> float:
        return self.prediction().drain_s(backlog, rows_per_step)

    def step_s(self, num_rows: float, mean_tokens_per_row: float) -> float:
        return self.prediction().step_s(num_rows, mean_tokens_per_row)


@dataclass(frozen=True)
class DegradeLevel:
    """A faster calibrated exit setting a request allows under overload (see ``admit``)."""

    criterion_code: int
    threshold: float  # native threshold of the criterion
    speed: float
    drop_pts: float  # calibrated accuracy drop against full depth (95 % upper bound), percentage points
    mean_exit_layer: float  # calibrated: how deep rows go until the engine has learned it


@dataclass(slots=True)
class Admitted:
    """Where ``admit`` placed a request: ``level`` None = its own setting."""

    predicted_s: float
    level: DegradeLevel | None = None
    expected_layers: float = 0.0
    cut_at_deadline: bool = False  # best effort admitted only because a first layer fits in time


def admit(
    prediction: ServicePrediction,
    ahead: Backlog,
    num_rows: int,
    mean_tokens_per_row: float,
    expected_layers: float,
    deadline_s: float | None,
    now_s: float,
    max_queue_wait_ms: float | None,
    *,
    levels: tuple[DegradeLevel, ...] = (),
    level_layers: tuple[float, ...] = (),
    target_latency_s: float | None = None,
    best_effort: bool = False,
    cut_wait_s: float | None = None,
) -> Admitted:
    """Degrade before shedding: the request's own setting if it is predicted to be answered in time,
    else the least degraded of ``levels`` (ordered from least to most degraded, ``level_layers`` their
    expected depths) that is; only when none is does the refusal of its own setting stand. In time means
    before its deadline; without one, within ``target_latency_s`` when set (a deadline-less request that
    no level brings under the target runs at the fastest level the queue-wait bound admits). A
    ``best_effort`` request that fits no level is still admitted, at its fastest level, for as many
    layers as fit before its deadline when at least one does (it is answered from the deepest ramp
    computed by then, and counts in the backlog for those layers only). ``cut_wait_s`` bounds its wait
    for a first layer when best-effort rows ahead will be cut at their own, earlier deadlines.
    """
    if not levels and not (best_effort and deadline_s is not None):
        # (Most requests.) One setting to try and no cut to fall back on: its own check decides. This
        # runs twice per request (the front end's check and the core's): no search machinery for it.
        predicted_s = check_admission(
            prediction,
            ahead,
            num_rows,
            mean_tokens_per_row,
            expected_layers,
            deadline_s,
            now_s,
            max_queue_wait_ms,
        )
        return Admitted(predicted_s, None, expected_layers)
    options = [expected_layers, *level_layers]
    choices: list[DegradeLevel | None] = [None, *levels]
    refusal: EngineError | None = None
    fallback: Admitted | None = None
    for level, layers in zip(choices, options, strict=True):
        try:
            predicted_s = check_admission(
                prediction, ahead, num_rows, mean_tokens_per_row, layers, deadline_s, now_s, max_queue_wait_ms
            )
        except (QueueFullError, DeadlineExceededError) as e:
            refusal = refusal or e
            continue
        admitted = Admitted(predicted_s, level, layers)
        if deadline_s is not None or target_latency_s is None or not prediction.ready:
            return admitted
        if ADMISSION_MARGIN * predicted_s <= target_latency_s:
            return admitted
        fallback = admitted  # over the target: keep looking for a faster level
    if fallback is not None:
        return fallback
    assert refusal is not None
    if best_effort and deadline_s is not None and prediction.ready:
        # As many layers as fit before the deadline (it is cut there), at least one: the backlog then
        # holds what this request will really compute, not its full depth. Drained in full steps, not
        # in the deadline-sized cohorts of ``check_admission``: a cut row needs no cohort of its own.
        fastest = choices[-1]
        stretch = ADMISSION_MARGIN * prediction.correction
        wait_s = prediction.drain_s(ahead)
        if cut_wait_s is not None:
            wait_s = min(wait_s, cut_wait_s)
        for layers in range(max(1, math.ceil(options[-1]) - 1), 0, -1):
            own = Backlog.of_rows(num_rows, float(layers), mean_tokens_per_row)
            if now_s + stretch * (wait_s + prediction.drain_s(own)) <= deadline_s:
                # Predicted 0: what this request's answer time teaches the correction would be its
                # cut, not the model's error.
                return Admitted(0.0, fastest, float(layers), cut_at_deadline=True)
    raise refusal
