"""The app factory: settings and an engine factory in, a FastAPI app out. No module-level app.

Start-up (lifespan): build the engine with the metrics as its observer, bind the metrics to the model,
start the engine. Shutdown: mark the app draining (/readyz 503), then ``engine.stop()`` lets in-flight
requests finish. uvicorn has stopped accepting connections and waited for open ones by then.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from server.api import fast_v1, routes_tei, routes_v1, routes_v2
from server.api.errors import install_error_handlers
from server.api.fast_v1 import FastClassifyMiddleware
from server.api.middleware import ApiKeyMiddleware, BodyLimitMiddleware, TimingMiddleware
from server.api.state import AppState, EngineFactory
from server.gc_freeze import freeze_alive
from server.metrics import Registry, ServerMetrics
from server.settings import Settings

logger = logging.getLogger("exitserve.api")
API_VERSION = "1"


def create_app(
    settings: Settings,
    engine_factory: EngineFactory,
    registry: Registry | None = None,
    multiprocess_metrics: bool = False,
    fast_classify: bool = True,
    freeze_gc: bool = False,
) -> FastAPI:
    """A new app serving the engine that ``engine_factory(observer)`` builds at start-up.

    ``registry`` receives every metric (a fresh one if not given; never the global registry).
    ``multiprocess_metrics``: one of several front-end processes (``server.metrics.ServerMetrics``).
    ``fast_classify``: answer valid ``POST /v1/classify`` requests in ``server.api.fast_v1`` (False: all
    through the route; tests compare the two).
    ``freeze_gc``: once started, collect and freeze every object alive (the app, the engine client, the
    libraries) out of later collections: a served process's own (``python -m server``), never a test's.
    """
    metrics = ServerMetrics(settings.model, registry, multiprocess=multiprocess_metrics)
    state = AppState(settings=settings, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = engine_factory(metrics)
        info = engine.model_info
        if info.name != settings.model:
            logger.warning("serving model %r while settings name %r", info.name, settings.model)
        metrics.bind_model(info.num_layers, info.default_speed)
        metrics.set_model_version(info.version)
        expected = (info.live_guard or {}).get("expected_agreement")
        if isinstance(expected, dict):
            metrics.set_guard_expectation({str(k): float(v) for k, v in expected.items()})
        if info.calibration_table is not None and info.calibration_table.agreement_table is not None:
            metrics.set_trust_table(info.calibration_table.agreement_table)
        metrics.set_ready_function(state.is_ready)
        await engine.start()
        state.engine = engine
        state.loop = asyncio.get_running_loop()
        if freeze_gc:
            # Requests waiting for the engine outlive young collections, so under load they reach the
            # oldest generation and trigger full collections, each a pass over every object alive. Not
            # frozen, the two front-end processes of --frontends 2 (~100,000 objects each; otherwise the
            # defaults, tiny model) ran 5 and 17 full collections in 20 s of 150-character texts, up to
            # 69 and 75 ms each with the event loop stalled; frozen, 14 and 14, at most 6.2 and 1.9 ms.
            freeze_alive()
        logger.info("serving %s version %s (%d layers)", info.name, info.version, info.num_layers)
        try:
            yield
        finally:
            drain = state.drain_engine()  # already under way when SIGTERM started the drain
            if drain is not None:
                await drain
            logger.info("engine stopped")

    app = FastAPI(
        title="exitserve",
        version=API_VERSION,
        description="Early-exit BERT classification: easy inputs leave the encoder early.",
        lifespan=lifespan,
        **_no_native_telemetry(),
    )
    app.state.exitserve = state
    install_error_handlers(app)
    app.include_router(routes_v1.router)
    app.include_router(routes_v2.router)
    app.include_router(routes_tei.router)
    _document_hand_read_bodies(app)

    # add_middleware wraps: the last added runs first. Order seen by a request:
    # timing/metrics -> CORS -> API key -> body cap -> (valid POST /v1/classify answered here) -> routes.
    if fast_classify:
        classify_route = next(r for r in routes_v1.router.routes if getattr(r, "path", None) == fast_v1.PATH)
        app.add_middleware(FastClassifyMiddleware, state=state, route=classify_route)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(
            ApiKeyMiddleware, api_key=settings.api_key.get_secret_value(), open_paths=settings.open_paths
        )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-Id"],
            expose_headers=[
                "X-Queue-Time-Ms",
                "X-Inference-Time-Ms",
                "X-Total-Time-Ms",
                "X-Request-Id",
                "Retry-After",
            ],
        )
    app.add_middleware(TimingMiddleware, metrics=metrics)
    return app


def _no_native_telemetry() -> dict[str, Any]:
    """Recent FastAPI releases ask OpenTelemetry on every request whether a provider is configured
    (several reads of the environment per request); exitserve's telemetry is its Prometheus metrics and
    JSON logs, so that bridge is off where the installed FastAPI has it."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def _document_hand_read_bodies(app: FastAPI) -> None:
    """The v2 infer body is read by hand (JSON, maybe followed by binary tensors): the schemas its
    documented JSON form refers to go into the OpenAPI document's components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in routes_v2.INFER_BODY_DEFS.items():
                schemas.setdefault(name, schema)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
