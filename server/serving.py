"""What every HTTP front end shares: connection limits, the uvicorn config, the draining server."""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI

from server.http_protocol import ConnectionLimits, default_max_connections, protocol_class
from server.settings import Settings

logger = logging.getLogger("exitserve")
DRAIN_ANSWER_GRACE_S = 2


class DrainingServer(uvicorn.Server):
    """A uvicorn server that reports draining on SIGTERM and exits 0 after a graceful stop."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)
        # uvicorn >= 0.29 re-raises a captured signal after shutdown, so SIGTERM would end the process
        # with status 143 after a clean drain. A drained server exits 0 instead.
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and isinstance(captured, list) and sig in captured:
            captured.remove(sig)


def connection_limits(settings: Settings) -> ConnectionLimits:
    """The HTTP connection limits of these settings (the connection cap from the open-file limit)."""
    return ConnectionLimits(
        request_head_timeout_s=settings.request_head_timeout_s,
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        max_request_line_bytes=settings.max_request_line_bytes,
        max_connections=settings.max_connections or default_max_connections(),
    )


def draining_server(app: FastAPI, settings: Settings) -> DrainingServer:
    """uvicorn for ``app`` with the connection limits and the drain timing of ``settings``."""
    limits = connection_limits(settings)
    logger.info(
        "connections: at most %d open, request head within %g s, %d header bytes, %d header fields",
        limits.max_connections,
        limits.request_head_timeout_s,
        limits.max_header_bytes,
        limits.max_headers,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol_class(limits),
        log_level=settings.log_level,
        log_config=None,  # uvicorn's own lines go through our handler (text or JSON), not its formatter
        access_log=False,  # our own access log (exitserve.access) names the route, never the body
        # The engine answers what is left at drain_timeout_s with 503; uvicorn waits a little longer so
        # those answers go out before it would cancel the requests itself.
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s) + DRAIN_ANSWER_GRACE_S,
        timeout_keep_alive=math.ceil(settings.keep_alive_timeout_s),
        lifespan="on",
    )
    return DrainingServer(config, on_exit=app.state.exitserve.begin_drain)
