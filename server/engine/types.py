"""Plain data crossing the engine's boundaries: API <-> engine, and engine -> metrics observer.

Nothing here imports torch, fastapi or prometheus_client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from model_store.manifest import CalibrationTable
from model_store.policy import Criterion
from server.engine.admission import DegradeLevel

# What a request classifies: texts, or (text, text_pair) pairs for a pair model.
Inputs = list[str] | list[tuple[str, str]]


class BatchingMode(StrEnum):
    """How the engine keeps batches full as rows exit."""

    REFILL = "refill"  # layer-level continuous batching: new rows start at layer 1, same-depth cohorts merge
    SHRINK = "shrink"  # a batch runs until its last row exits; the next batch waits


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of the engine (built from the server settings)."""

    max_batch_size: int = 64  # rows per layer step
    max_batch_tokens: int = 16384  # sum of padded lengths per layer step
    max_wait_ms: float = 2.0  # how long a lone request waits for company before its batch starts
    max_queue_size: int = 1024  # rows waiting for admission; beyond it: QueueFullError
    max_queue_wait_ms: float | None = 500.0  # requests without a deadline: refused past this predicted wait
    target_latency_ms: float | None = None  # deadline-less requests that allow it degrade past this
    calibrate_step_cost: bool = True  # time a few synthetic steps at start-up (admission predicts with them)
    max_inputs_per_request: int = 256
    mode: BatchingMode = BatchingMode.REFILL
    max_inflight_rows: int | None = None  # refill: rows holding hidden states; None = max_batch_size
    device: str = "cpu"
    dtype: str = "float32"  # float32 | float16 | bfloat16 (half precisions on CUDA only)
    cuda_graphs: bool = True  # on CUDA: replay captured layer steps up to max_batch_size rows
    strict_length: bool = False  # True: inputs longer than max_seq_length are refused (413), else truncated
    step_timeout_s: float = 30.0  # a layer step running longer than this means the engine hung
    watchdog_interval_s: float = 0.5
    guard_sample_fraction: float = 0.01  # share of early exits also run to full depth (spare capacity only)
    max_shadow_rows: int = 64
    auto_adjust: bool = False  # move the default speed to keep live agreement at its target
    auto_adjust_target_agreement: float | None = None  # default: calibrated agreement at the default speed
    auto_adjust_window: int = 50  # shadow samples per decision


@dataclass(slots=True)
class ClassifyOptions:
    """What one request asks for; applies to each of its inputs. Built per request: slotted, not frozen
    (see ``RowOutcome``); nothing mutates it."""

    criterion: Criterion
    speed: float
    max_layers: int | None = None  # 1-based cap; None = all layers
    deadline_s: float | None = None  # absolute time.monotonic() deadline
    speed_is_default: bool = False  # the request did not set a speed (auto-adjust only learns from these)
    best_effort: bool = False  # at the deadline: the deepest ramp's answer so far, not a 504
    drop_pts: float = 0.0  # calibrated accuracy drop of (criterion, speed) against full depth, points
    degrade_levels: tuple[DegradeLevel, ...] = ()  # faster settings allowed under overload, least first
    refuse_truncated: bool = False  # an input longer than the model takes is a 413, not cut (TEI's default)


# The two records built per answer are slotted, not frozen: a frozen dataclass builds through
# ``object.__setattr__`` per field (RowOutcome: ~1.3 vs ~0.4 us). Nothing mutates them.
@dataclass(slots=True)
class RowOutcome:
    """The answer for one input."""

    label: str
    label_index: int
    score: float  # probability of ``label``
    probs: list[float]
    exit_layer: int  # 1-based ramp that answered
    num_layers_run: int
    truncated: bool  # input was cut to the model's max_seq_length
    deadline_exit: bool = False  # answered at the deadline from the deepest ramp computed (best effort)
    # Calibrated probability that this answer equals the full-depth answer (by exit layer and
    # confidence); None when the model's calibration has no such table.
    full_depth_agreement: float | None = None


@dataclass(slots=True)
class ClassifyResult:
    """The answer for one request, with the timings that go back in response headers."""

    rows: list[RowOutcome]
    model: str
    version: str
    criterion: Criterion  # the setting the rows ran at (degraded under overload, if allowed)
    speed: float
    queue_time_s: float  # admission -> first layer computed for the request's first row
    inference_time_s: float  # first layer -> last row answered
    degraded: bool = False  # overload: ran at a faster setting than asked, within the allowed drop
    requested_criterion: Criterion | None = None  # set when degraded
    requested_speed: float | None = None  # set when degraded
    predicted_drop_pts: float | None = None  # calibrated accuracy drop of the setting used, when degraded


@dataclass(frozen=True)
class ModelInfo:
    """What the API tells about the served model (``GET /v1/models``)."""

    name: str
    version: str
    architecture: str
    num_layers: int
    labels: list[str]
    max_seq_length: int
    default_criterion: Criterion
    default_speed: float
    calibration: dict[str, object] | None = None  # the manifest's calibration table as JSON
    # The same table, typed (model_store.manifest.CalibrationTable), for resolving accuracy targets once
    # per request without re-validating the JSON; None without calibration.
    calibration_table: CalibrationTable | None = None
    provenance: dict[str, object] = field(default_factory=dict)
    live_guard: dict[str, object] | None = None  # live agreement per speed bucket, auto-adjust state
    input_kind: str = "text"  # "text" or "pair" (the manifest's input_kind)


class DisconnectWatch(Protocol):
    """Tells when a request's client has gone away (``server/api/state.py``: from the HTTP connection
    itself, or by reading the ASGI ``receive``)."""

    def watch(self, on_gone: Callable[[], None]) -> Callable[[], None]:
        """Call ``on_gone`` (once, on the event loop) when the client goes away; returns the function
        that stops watching."""
        ...


class EngineObserver(Protocol):
    """What the engine reports; server/metrics.py implements it with prometheus_client."""

    def queue_depth(self, num_rows: int) -> None: ...

    def inflight(self, num_requests: int, num_rows: int) -> None: ...

    def queue_waits(self, waits_s: Sequence[float]) -> None: ...

    def layer_step(self, layer: int, num_rows: int, num_tokens: int) -> None: ...

    def row_exited(self, exit_layer: int, num_layers: int, num_rows: int = 1) -> None: ...

    def batch_failed(self, num_requests: int) -> None: ...

    def engine_restarted(self) -> None: ...

    def guard_result(self, bucket: str, agreed: bool) -> None: ...

    def guard_trust_result(self, layer: int, bin_label: str, agreed: bool) -> None: ...

    def guard_dropped(self, num_rows: int) -> None: ...

    def default_speed_changed(self, speed: float) -> None: ...

    def admission_refused(self, reason: str) -> None: ...

    def deadline_dropped(self, num_before_start: int, num_in_flight: int) -> None: ...

    def predicted_backlog(self, seconds: float) -> None: ...

    def deadline_exits(self, num_rows: int) -> None: ...

    def admitted_at(self, bucket: str, speed: float, drop_pts: float, num_degraded_rows: int) -> None: ...


class NullObserver:
    """An observer that records nothing (tests, tools)."""

    def queue_depth(self, num_rows: int) -> None:
        pass

    def inflight(self, num_requests: int, num_rows: int) -> None:
        pass

    def queue_waits(self, waits_s: Sequence[float]) -> None:
        pass

    def layer_step(self, layer: int, num_rows: int, num_tokens: int) -> None:
        pass

    def row_exited(self, exit_layer: int, num_layers: int, num_rows: int = 1) -> None:
        pass

    def batch_failed(self, num_requests: int) -> None:
        pass

    def engine_restarted(self) -> None:
        pass

    def guard_result(self, bucket: str, agreed: bool) -> None:
        pass

    def guard_trust_result(self, layer: int, bin_label: str, agreed: bool) -> None:
        pass

    def guard_dropped(self, num_rows: int) -> None:
        pass

    def default_speed_changed(self, speed: float) -> None:
        pass

    def admission_refused(self, reason: str) -> None:
        pass

    def deadline_dropped(self, num_before_start: int, num_in_flight: int) -> None:
        pass

    def predicted_backlog(self, seconds: float) -> None:
        pass

    def deadline_exits(self, num_rows: int) -> None:
        pass

    def admitted_at(self, bucket: str, speed: float, drop_pts: float, num_degraded_rows: int) -> None:
        pass
