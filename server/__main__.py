"""``python -m server``: load the model from the store, build the engine, serve HTTP with uvicorn.

SIGTERM / SIGINT drain gracefully: /readyz turns 503 at once, uvicorn stops accepting connections and
waits up to ``drain_timeout_s`` for open requests, then the app's lifespan stops the engine; exit 0.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType

import uvicorn

from server.api import create_app
from server.http_protocol import ConnectionLimits, default_max_connections, protocol_class
from server.settings import Settings, load_settings

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


def configure_logging(level: str) -> None:
    """Plain-text logs on stderr; request texts are never logged."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def serve(settings: Settings) -> int:
    """Load the model and serve until stopped; the exit status."""
    import torch

    from model_store.errors import ModelStoreError
    from model_store.store import ModelStore
    from server.engine.local import LocalEngine

    configure_logging(settings.log_level)
    # On a CPU box torch would take every core and starve the event loop: requests then wait in socket
    # buffers before any deadline clock starts (measured: client p99 3.1 s vs 1.1 s at a 1 s deadline).
    num_threads = settings.torch_threads or max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(num_threads)
    logger.info("loading model %r from %s (torch threads: %d)", settings.model, settings.store, num_threads)
    try:
        loaded = ModelStore(settings.store).load(
            settings.model,
            settings.model_version,
            device=settings.device,
            dtype=getattr(torch, settings.dtype),
        )
    except ModelStoreError as e:
        logger.error("cannot load the model: %s", e)
        logger.error(
            "build the default model with: python -m model_store ensure-default --store %s", settings.store
        )
        return 1
    # The model, its tokenizer and the libraries hold millions of objects that live as long as the
    # process: a full (gen 2) collection scanned them all and stalled every request for 220-250 ms
    # (measured at 1.5x load). Frozen, they are left out of every collection.
    gc.collect()
    gc.freeze()
    engine_config = settings.engine_config()
    app = create_app(settings, lambda observer: LocalEngine(loaded, engine_config, observer))
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
        access_log=False,  # our own access log (exitserve.access) names the route, never the body
        # The engine answers what is left at drain_timeout_s with 503; uvicorn waits a little longer so
        # those answers go out before it would cancel the requests itself.
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s) + DRAIN_ANSWER_GRACE_S,
        timeout_keep_alive=math.ceil(settings.keep_alive_timeout_s),
        lifespan="on",
    )
    server = DrainingServer(config, on_exit=app.state.exitserve.begin_drain)
    server.run()
    return 0 if server.started else 3  # 3: start-up failed (uvicorn's own code for it)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m server`` and the ``exitserve`` script."""
    return serve(load_settings(argv))


if __name__ == "__main__":
    sys.exit(main())
