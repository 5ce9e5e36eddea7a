"""Prometheus metrics: what the engine reports (an EngineObserver) and what the HTTP layer sees.

The only module that imports prometheus_client. Every metric lives in one injected CollectorRegistry
(never the global one), so two apps in one process (tests) never share counters. Labels stay
low-cardinality: the model name, a route template, a status code, a layer number.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from model_store.manifest import AgreementTable

PREFIX = "exitserve"
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUEUE_WAIT_BUCKETS_S = (0.0001, 0.00025, 0.0005, *LATENCY_BUCKETS_S)
BATCH_SIZE_BUCKETS = tuple(float(2**k) for k in range(10))  # 1, 2, 4, ..., 512
EXPOSITION_CONTENT_TYPE = CONTENT_TYPE_LATEST
ADMISSION_REFUSAL_REASONS = ("deadline", "queue_wait", "queue_full", "deadline_unreachable")
# Gauges in multiprocess mode: the value of the process that set it last, while that process lives.
LATEST: Final = "livemostrecent"
Registry = CollectorRegistry  # re-exported: the rest of the codebase never imports prometheus_client

# No *_created series: they double the series count and no dashboard or rule here reads them.
# (A process-wide switch in prometheus_client; this module is its only user.)
disable_created_metrics()


def observe_all(histogram: Any, values: Sequence[float]) -> None:
    """What ``histogram.observe(v)`` for each of ``values`` records, as one update of the sum and one of
    each bucket hit. The engine observes one value per row or request of a step (exit layers, queue
    waits); prometheus_client has no batched observe, and its ``observe`` takes a lock and scans the
    bounds per call: 1.1-1.5 us here, 2.0 in multi-process mode, so ~165 us (~255) of a step of 64
    one-row requests for the two histograms; batched, ~12 us (~10) (``timeit``). Uses the histogram
    child's ``_upper_bounds``, ``_buckets`` and ``_sum``, the same in single- and multi-process mode;
    tests/server/test_metrics.py checks the exposition against plain ``observe`` calls."""
    if not values:
        return
    bounds, buckets = histogram._upper_bounds, histogram._buckets
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect_left(bounds, value)] += 1  # the first bound >= value: where ``observe`` counts it
    histogram._sum.inc(sum(values))
    for index, count in enumerate(counts):
        if count:
            buckets[index].inc(count)


def observe_repeated(histogram: Any, value: float, count: int) -> None:
    """``count`` observations of one ``value`` (a step's rows leaving at one layer) as one update of
    the sum and one of the bucket (see ``observe_all``)."""
    if count <= 0:
        return
    histogram._sum.inc(value * count)
    histogram._buckets[bisect_left(histogram._upper_bounds, value)].inc(count)


def mark_process_dead(pid: int) -> None:
    """A process of a multi-process server exited: its live gauges leave the view (counts stay)."""
    multiprocess.mark_process_dead(pid)


class ServerMetrics:
    """All metrics of one server process for one served model.

    With ``multiprocess`` (``--frontends`` > 1: several front-end processes and an engine-core process),
    every process writes its samples to files in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's
    multiprocess mode, chosen at import from that environment variable, which the supervisor sets before
    it starts the processes) and any front end's ``/metrics`` sums them: counters and histograms over
    every process, gauges from the process that set them last (the core sets the engine's).

    ``registry`` receives every metric (a new one if not given; never the global registry).
    Implements ``server.engine.types.EngineObserver``; its methods may be called from the engine's
    worker thread (prometheus_client is thread-safe). The exit-layer histogram needs the model's number
    of layers for its buckets (1..L), so it is created by :meth:`bind_model` once the engine knows it;
    engine reports before that are not expected (the engine is started after binding).
    """

    def __init__(
        self, model: str, registry: CollectorRegistry | None = None, multiprocess: bool = False
    ) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.registry = registry
        self.multiprocess = multiprocess
        self._is_ready: Callable[[], bool] | None = None
        self.model = model
        self.num_layers: int | None = None
        self._exit_layer: Histogram | None = None
        self._exit_layer_child: Histogram | None = None
        reg = registry
        self._requests = Counter(
            f"{PREFIX}_requests", "HTTP requests answered", ["model", "route", "status"], registry=reg
        )
        self._request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "End-to-end HTTP request latency, by route and status (a fast 429 is not a good answer)",
            ["model", "route", "status"],
            buckets=LATENCY_BUCKETS_S,
            registry=reg,
        )
        self._http_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}  # labelled once
        self._queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time from admission to the first layer computed",
            ["model"],
            buckets=QUEUE_WAIT_BUCKETS_S,
            registry=reg,
        ).labels(model)
        self._batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Rows per layer step",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=reg,
        ).labels(model)
        self._layers_run = Counter(
            f"{PREFIX}_layers_run", "Row-layers computed", ["model"], registry=reg
        ).labels(model)
        self._layers_saved = Counter(
            f"{PREFIX}_layers_saved", "Row-layers skipped by early exit", ["model"], registry=reg
        ).labels(model)
        self._rows_per_layer = Counter(
            f"{PREFIX}_rows_per_layer", "Rows that ran layer k", ["model", "layer"], registry=reg
        )
        self._rows_per_layer_children: dict[int, Counter] = {}
        self._rows = Counter(f"{PREFIX}_rows", "Input rows answered", ["model"], registry=reg).labels(model)
        self._queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Rows waiting for admission",
            ["model"],
            registry=reg,
            multiprocess_mode=LATEST,
        ).labels(model)
        self._inflight = Gauge(
            f"{PREFIX}_inflight_requests",
            "Requests admitted and not answered",
            ["model"],
            registry=reg,
            multiprocess_mode=LATEST,
        ).labels(model)
        self._batch_failures = Counter(
            f"{PREFIX}_batch_failures", "Batches whose computation raised", ["model"], registry=reg
        ).labels(model)
        self._engine_restarts = Counter(
            f"{PREFIX}_engine_restarts", "Engine worker restarts", ["model"], registry=reg
        ).labels(model)
        self._ready = Gauge(
            f"{PREFIX}_ready", "1 when serving, else 0", ["model"], registry=reg, multiprocess_mode=LATEST
        ).labels(model)
        # Live accuracy guard (server/engine/guard.py); bucket = speed rounded down to 0.1 (11 values).
        self._guard_samples = Counter(
            f"{PREFIX}_guard_samples",
            "Early exits re-run to full depth, by speed bucket and whether the answers agreed",
            ["model", "bucket", "agreed"],
            registry=reg,
        )
        self._guard_dropped = Counter(
            f"{PREFIX}_guard_dropped",
            "Shadow rows dropped for lack of spare capacity",
            ["model"],
            registry=reg,
        ).labels(model)
        self._guard_expected = Gauge(
            f"{PREFIX}_guard_expected_agreement",
            "Calibrated agreement of early exits with full depth, by speed bucket (the alert's reference)",
            ["model", "bucket"],
            registry=reg,
            multiprocess_mode=LATEST,
        )
        self._default_speed = Gauge(
            f"{PREFIX}_default_speed",
            "Speed for requests that set none",
            ["model"],
            registry=reg,
            multiprocess_mode=LATEST,
        ).labels(model)
        # Admission by time (server/engine/scheduler.py).
        self._admission_refused = Counter(
            f"{PREFIX}_admission_refused",
            "Requests refused at admission: deadline (would be answered late), queue_wait (over the "
            "queue-wait bound), queue_full (row cap), deadline_unreachable (too much work for its deadline)",
            ["model", "reason"],
            registry=reg,
        )
        for reason in ADMISSION_REFUSAL_REASONS:
            self._admission_refused.labels(model, reason)
        self._deadline_dropped = Counter(
            f"{PREFIX}_deadline_dropped_rows",
            "Rows dropped because they could no longer meet their deadline: before_start (no compute "
            "spent) or in_flight (compute spent in vain)",
            ["model", "stage"],
            registry=reg,
        )
        self._dropped_before_start = self._deadline_dropped.labels(model, "before_start")
        self._dropped_in_flight = self._deadline_dropped.labels(model, "in_flight")
        self._predicted_backlog = Gauge(
            f"{PREFIX}_predicted_backlog_seconds",
            "Predicted time to compute the rows waiting and in flight (what admission refuses by)",
            ["model"],
            registry=reg,
            multiprocess_mode=LATEST,
        ).labels(model)
        # The trust figure (model_store.manifest.AgreementTable), checked live by the shadow re-runs.
        self._trust_samples = Counter(
            f"{PREFIX}_guard_trust_samples",
            "Shadow re-runs of early exits by exit layer and confidence bin, and whether the early answer "
            "agreed with full depth",
            ["model", "layer", "bin", "agreed"],
            registry=reg,
        )
        self._trust_stated = Gauge(
            f"{PREFIX}_trust_stated_agreement",
            "Calibrated probability that an answer from this exit layer and confidence bin equals the "
            "full-depth answer (what replies state as full_depth_agreement)",
            ["model", "layer", "bin"],
            registry=reg,
            multiprocess_mode=LATEST,
        )
        # Rows queued or in flight (a 256-input request counts 256): what the HPA scales on.
        self._rows_in_system = Gauge(
            f"{PREFIX}_rows_in_system",
            "Input rows admitted and not yet answered (queued or in flight)",
            ["model"],
            registry=reg,
            multiprocess_mode=LATEST,
        ).labels(model)
        # The model version this process serves: pods on different versions show up as two series.
        self._model_info = Gauge(
            f"{PREFIX}_model_info",
            "1 for the model version served",
            ["model", "version"],
            registry=reg,
            multiprocess_mode=LATEST,
        )
        # Anytime answers and degradation under overload.
        self._deadline_exits = Counter(
            f"{PREFIX}_deadline_exit_rows",
            "Best-effort rows answered at their deadline from the deepest ramp computed",
            ["model"],
            registry=reg,
        ).labels(model)
        self._degraded_rows = Counter(
            f"{PREFIX}_degraded_rows",
            "Rows run at a faster setting than asked, under overload, within the accuracy drop their "
            "request allows; bucket = the asked speed rounded down to 0.1",
            ["model", "bucket"],
            registry=reg,
        )
        self._effective_speed = Gauge(
            f"{PREFIX}_effective_speed",
            "Speed the latest admitted request that allows degradation runs at, per asked-speed bucket",
            ["model", "bucket"],
            registry=reg,
            multiprocess_mode=LATEST,
        )
        self._predicted_drop = Gauge(
            f"{PREFIX}_predicted_accuracy_drop_points",
            "Calibrated accuracy drop against full depth (95 % upper bound, points) of the setting the "
            "latest admitted request that allows degradation runs at, per asked-speed bucket",
            ["model", "bucket"],
            registry=reg,
            multiprocess_mode=LATEST,
        )

    # --- set-up -------------------------------------------------------------------------------------

    def set_guard_expectation(self, expected_agreement: dict[str, float]) -> None:
        """Publish the calibrated agreement per speed bucket, next to the live tallies."""
        for bucket, agreement in expected_agreement.items():
            self._guard_expected.labels(self.model, bucket).set(agreement)

    def set_trust_table(self, table: AgreementTable) -> None:
        """Publish the stated trust figure per (exit layer, confidence bin) next to the live tallies."""
        for row in table.cells()[:-1]:  # the last layer is full depth itself
            for cell in row:
                self._trust_stated.labels(self.model, str(cell.layer), cell.label).set(cell.stated)

    def set_model_version(self, version: str) -> None:
        """``exitserve_model_info{version}`` = 1 for the version served."""
        self._model_info.labels(self.model, version).set(1)

    def bind_model(self, num_layers: int, default_speed: float | None = None) -> None:
        """Create the per-layer metrics for a model of ``num_layers`` layers (buckets le=1..L)."""
        if default_speed is not None:
            self._default_speed.set(default_speed)
        if self._exit_layer is not None:
            if num_layers != self.num_layers:
                raise ValueError(f"metrics are bound to {self.num_layers} layers, not {num_layers}")
            return
        self.num_layers = num_layers
        self._exit_layer = Histogram(
            f"{PREFIX}_exit_layer",
            "Layer whose ramp answered, one observation per input row",
            ["model"],
            buckets=tuple(float(k) for k in range(1, num_layers + 1)),
            registry=self.registry,
        )
        self._exit_layer_child = self._exit_layer.labels(self.model)
        for layer in range(1, num_layers + 1):  # every layer shows up at 0 before traffic
            self._rows_per_layer.labels(self.model, str(layer))

    def set_ready_function(self, is_ready: Callable[[], bool]) -> None:
        """Read readiness at scrape time, so the gauge cannot go stale."""
        self._is_ready = is_ready
        if not self.multiprocess:  # (functions are per process: in multiprocess mode, set at scrape)
            self._ready.set_function(lambda: 1.0 if is_ready() else 0.0)

    # --- HTTP ---------------------------------------------------------------------------------------

    def http_request(self, route: str, status: int, duration_s: float) -> None:
        """One answered HTTP request; ``route`` is a route template, never a raw path."""
        children = self._http_children.get((route, status))
        if children is None:  # bounded: route templates times statuses
            labels = (self.model, route, str(status))
            children = (self._requests.labels(*labels), self._request_duration.labels(*labels))
            self._http_children[(route, status)] = children
        children[0].inc()
        children[1].observe(duration_s)

    def exposition(self) -> bytes:
        """The registry (in multiprocess mode: every process's samples) in the Prometheus text format."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        if self._is_ready is not None:
            self._ready.set(1.0 if self._is_ready() else 0.0)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)

    # --- EngineObserver -----------------------------------------------------------------------------

    def queue_depth(self, num_rows: int) -> None:
        self._queue_depth.set(num_rows)

    def inflight(self, num_requests: int, num_rows: int) -> None:
        self._inflight.set(num_requests)
        self._rows_in_system.set(num_rows)

    def queue_waits(self, waits_s: Sequence[float]) -> None:
        observe_all(self._queue_wait, waits_s)

    def layer_step(self, layer: int, num_rows: int, num_tokens: int) -> None:
        self._batch_size.observe(num_rows)
        self._layers_run.inc(num_rows)
        rows_per_layer = self._rows_per_layer_children.get(layer)
        if rows_per_layer is None:  # labelled once per layer, not per step
            rows_per_layer = self._rows_per_layer_children[layer] = self._rows_per_layer.labels(
                self.model, str(layer)
            )
        rows_per_layer.inc(num_rows)

    def row_exited(self, exit_layer: int, num_layers: int, num_rows: int = 1) -> None:
        """``num_rows`` rows left at ``exit_layer`` (the core reports a step's exits per layer at once)."""
        if self._exit_layer is None:  # reports before bind_model: bind from what the engine says
            self.bind_model(num_layers)
        assert self._exit_layer_child is not None
        observe_repeated(self._exit_layer_child, float(exit_layer), num_rows)
        self._layers_saved.inc((num_layers - exit_layer) * num_rows)
        self._rows.inc(num_rows)

    def batch_failed(self, num_requests: int) -> None:
        self._batch_failures.inc()

    def engine_restarted(self) -> None:
        self._engine_restarts.inc()

    def guard_result(self, bucket: str, agreed: bool) -> None:
        self._guard_samples.labels(self.model, bucket, "true" if agreed else "false").inc()

    def guard_trust_result(self, layer: int, bin_label: str, agreed: bool) -> None:
        self._trust_samples.labels(self.model, str(layer), bin_label, "true" if agreed else "false").inc()

    def guard_dropped(self, num_rows: int) -> None:
        self._guard_dropped.inc(num_rows)

    def default_speed_changed(self, speed: float) -> None:
        self._default_speed.set(speed)

    def admission_refused(self, reason: str) -> None:
        self._admission_refused.labels(self.model, reason).inc()

    def deadline_dropped(self, num_before_start: int, num_in_flight: int) -> None:
        self._dropped_before_start.inc(num_before_start)
        self._dropped_in_flight.inc(num_in_flight)

    def predicted_backlog(self, seconds: float) -> None:
        self._predicted_backlog.set(seconds)

    def deadline_exits(self, num_rows: int) -> None:
        self._deadline_exits.inc(num_rows)

    def admitted_at(self, bucket: str, speed: float, drop_pts: float, num_degraded_rows: int) -> None:
        self._effective_speed.labels(self.model, bucket).set(speed)
        self._predicted_drop.labels(self.model, bucket).set(drop_pts)
        if num_degraded_rows:
            self._degraded_rows.labels(self.model, bucket).inc(num_degraded_rows)
