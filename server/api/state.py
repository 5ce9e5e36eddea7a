"""What the routes share: the engine behind a protocol, the settings, the metrics, the lifecycle.

The routes depend on :class:`ServingEngine` (the Engine contract), never on the concrete Engine, so API
tests drive them with a fake engine and no torch model.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request

from model_store.manifest import CalibrationTable
from model_store.policy import Criterion
from server.api.schemas import RequestOptions
from server.engine import targets
from server.engine.admission import DegradeLevel
from server.engine.errors import InvalidRequestError, NotReadyError, PayloadTooLargeError
from server.engine.targets import ResolvedTarget
from server.engine.types import (
    ClassifyOptions,
    ClassifyResult,
    DisconnectWatch,
    EngineObserver,
    Inputs,
    ModelInfo,
)
from server.metrics import ServerMetrics
from server.settings import Settings

REQUEST_START_KEY = "exitserve.start_s"  # scope key: time.monotonic() when the request arrived
# Scope key: the connection's own ``DisconnectWatch`` (``server/http_protocol.py``), where the server has one.
DISCONNECT_WATCH_KEY = "exitserve.disconnect_watch"


class ServingEngine(Protocol):
    """The engine contract: ``server.engine.local.LocalEngine``, or an ``EngineClient`` of a core
    running in its own process (``server/supervisor.py``)."""

    async def start(self) -> None: ...

    async def stop(self, drain_timeout_s: float = 30.0) -> None: ...

    def is_ready(self) -> bool: ...

    @property
    def model_info(self) -> ModelInfo: ...

    async def classify(
        self,
        texts: Inputs,
        options: ClassifyOptions,
        disconnect: DisconnectWatch | None = None,
    ) -> ClassifyResult: ...


EngineFactory = Callable[[EngineObserver], ServingEngine]


@dataclass
class AppState:
    """Per-app state (``app.state.exitserve``); nothing is module-global."""

    settings: Settings
    metrics: ServerMetrics
    engine: ServingEngine | None = None
    draining: bool = False
    started_at_s: float = field(default_factory=time.monotonic)
    loop: asyncio.AbstractEventLoop | None = None  # the app's loop, set at start-up
    engine_drain: asyncio.Future[None] | None = None  # the engine's stop, from the first drain signal

    def is_ready(self) -> bool:
        """Serving: the engine started and is ready, and the server is not draining."""
        return self.engine is not None and not self.draining and self.engine.is_ready()

    def begin_drain(self) -> None:
        """From now on /readyz says 503, and the engine drains (called on SIGTERM; safe in a signal
        handler). The engine answers what is still in flight after ``drain_timeout_s`` with 503 and
        drops its rows, before the HTTP server gives up on open requests."""
        self.draining = True
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.drain_engine)

    def drain_engine(self) -> asyncio.Future[None] | None:
        """Start stopping the engine (once); the future of that stop."""
        self.draining = True
        if self.engine is not None and self.engine_drain is None:
            self.engine_drain = asyncio.ensure_future(self.engine.stop(self.settings.drain_timeout_s))
        return self.engine_drain

    def require_engine(self) -> ServingEngine:
        """The engine, or NotReadyError (503) before start-up finished."""
        if self.engine is None:
            raise NotReadyError("the model is not loaded yet")
        return self.engine


async def get_state(request: Request) -> AppState:
    """The app's state (a FastAPI dependency; async, so FastAPI does not hop to a thread for it)."""
    state = request.app.state.exitserve
    assert isinstance(state, AppState)
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def check_num_inputs(num_inputs: int, settings: Settings, field_name: str = "inputs") -> None:
    """Refuse more inputs than a request may carry (413)."""
    if num_inputs > settings.max_inputs_per_request:
        raise PayloadTooLargeError(
            f"{field_name} holds {num_inputs} texts; at most {settings.max_inputs_per_request} per request"
        )


def build_options(
    request_options: RequestOptions, info: ModelInfo, settings: Settings, start_s: float
) -> ClassifyOptions:
    """The engine's options for a request: its own knobs, else the model's and server's defaults."""
    criterion: Criterion = request_options.criterion or info.default_criterion
    speed = request_options.speed if request_options.speed is not None else info.default_speed
    target = resolve_target(request_options, info)
    if target is not None:
        criterion, speed = target.criterion, target.speed
    max_layers = request_options.max_layers
    if max_layers is not None and max_layers > info.num_layers:
        raise InvalidRequestError(
            f"max_layers: {max_layers} is more than the model's {info.num_layers} layers", field="max_layers"
        )
    deadline_ms = request_options.deadline_ms or settings.default_deadline_ms
    deadline_s = None if deadline_ms is None else start_s + deadline_ms / 1000.0
    best_effort = request_options.on_deadline == "best_effort"
    if best_effort and deadline_s is None:
        raise InvalidRequestError(
            "on_deadline 'best_effort' needs a deadline: set deadline_ms (the server has no default)",
            field="on_deadline",
        )
    speed_is_default = request_options.speed is None and target is None
    budget = request_options.overload_max_accuracy_drop
    if budget is None and speed_is_default:
        budget = settings.overload_max_accuracy_drop
    drop_pts = 0.0
    levels: tuple[DegradeLevel, ...] = ()
    if budget is not None:
        plan = targets.degrade_plan(
            calibration_table(info), criterion, speed, budget, len(info.labels), info.num_layers
        )
        drop_pts, levels = plan.drop_pts, plan.levels
    return ClassifyOptions(
        criterion=criterion,
        speed=speed,
        max_layers=max_layers,
        deadline_s=deadline_s,
        speed_is_default=speed_is_default,
        best_effort=best_effort,
        drop_pts=drop_pts,
        degrade_levels=levels,
    )


def calibration_table(info: ModelInfo) -> CalibrationTable | None:
    """The model's calibration, typed (an engine that gives only the JSON, as test fakes do: parsed)."""
    if info.calibration_table is None and info.calibration:
        return CalibrationTable.model_validate(info.calibration)
    return info.calibration_table


def resolve_target(request_options: RequestOptions, info: ModelInfo) -> ResolvedTarget | None:
    """An accuracy or depth target turned into a calibrated (criterion, speed); None without a target."""
    drop, depth = request_options.max_accuracy_drop, request_options.max_mean_exit_layer
    if drop is None and depth is None:
        return None
    if request_options.speed is not None:
        raise InvalidRequestError("give either speed or an accuracy target, not both", field="speed")
    if drop is not None and depth is not None:
        raise InvalidRequestError(
            "give either max_accuracy_drop or max_mean_exit_layer, not both", field="max_mean_exit_layer"
        )
    table = calibration_table(info)
    if drop is not None:
        return targets.for_accuracy_drop(table, drop, request_options.criterion)
    assert depth is not None
    return targets.for_mean_exit_layer(table, depth, request_options.criterion)


def request_start_s(request: Request) -> float:
    """When the request arrived (set by the timing middleware), else now."""
    return scope_start_s(request.scope)


class ReceiveWatch:
    """A ``DisconnectWatch`` on any ASGI server: a task awaits ``receive``, which after the body returns
    only when the client has gone away (or the response is complete, when nobody watches any more).
    ~10 us of task per request; exitserve's own HTTP protocol puts a cheaper one in the scope."""

    def __init__(self, receive: Callable[[], Awaitable[object]]) -> None:
        self._receive = receive

    def watch(self, on_gone: Callable[[], None]) -> Callable[[], None]:
        task = asyncio.ensure_future(self._receive())
        task.add_done_callback(lambda t: None if t.cancelled() or t.exception() is not None else on_gone())

        def stop() -> None:
            task.cancel()

        return stop


def disconnect_watch(
    scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[object]]
) -> DisconnectWatch:
    """The connection's own watch when the server put one in the scope, else one that reads ``receive``."""
    watch = scope.get(DISCONNECT_WATCH_KEY)
    return watch if watch is not None else ReceiveWatch(receive)


def scope_start_s(scope: MutableMapping[str, Any]) -> float:
    """``request_start_s`` of an ASGI scope."""
    start = scope.get(REQUEST_START_KEY)
    return float(start) if isinstance(start, float) else time.monotonic()


def timing_headers(result: ClassifyResult) -> dict[str, str]:
    """X-Queue-Time-Ms and X-Inference-Time-Ms of a classify reply (the middleware adds X-Total-Time-Ms)."""
    return {
        "X-Queue-Time-Ms": format_ms(result.queue_time_s),
        "X-Inference-Time-Ms": format_ms(result.inference_time_s),
    }


def format_ms(seconds: float) -> str:
    """Seconds as milliseconds with three decimals, for a header."""
    return f"{max(0.0, seconds) * 1000.0:.3f}" if math.isfinite(seconds) else "0.000"
