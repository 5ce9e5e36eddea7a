"""``python -m server``: load the model from the store, build the engine, serve HTTP with uvicorn.

With one front end (``--frontends 1``) it is one process: uvicorn on the event loop, the engine core as a
thread. With N > 1 the supervisor (``server/supervisor.py``) runs N front-end processes on one port and
the engine core in a process of its own.

SIGTERM / SIGINT drain gracefully: /readyz turns 503 at once, uvicorn stops accepting connections and
waits up to ``drain_timeout_s`` for open requests, then the app's lifespan stops the engine; exit 0.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from server.gc_freeze import freeze_alive
from server.settings import Settings, available_cores, load_settings

if TYPE_CHECKING:
    from model_store.store import LoadedModel

logger = logging.getLogger("exitserve")


def torch_threads(settings: Settings) -> int:
    """On a CPU box torch would take every core and starve the event loop: requests then wait in socket
    buffers before any deadline clock starts (measured: client p99 3.1 s vs 1.1 s at a 1 s deadline)."""
    return settings.torch_threads or max(1, available_cores() - 1)


def load_model(settings: Settings) -> LoadedModel | None:
    """The model of ``settings`` on its device, or None (logged) when the store cannot give it."""
    import torch

    from model_store.errors import ModelStoreError
    from model_store.store import ModelStore

    num_threads = torch_threads(settings)
    torch.set_num_threads(num_threads)
    logger.info("loading model %r from %s (torch threads: %d)", settings.model, settings.store, num_threads)
    try:
        loaded = ModelStore(settings.store).load(
            settings.model,
            settings.model_version,
            device=settings.device,
        )  # float32: the runner casts the encoder to --dtype and keeps the ramps float32
    except ModelStoreError as e:
        logger.error("cannot load the model: %s", e)
        logger.error(
            "build the default model with: python -m model_store ensure-default --store %s", settings.store
        )
        return None
    # The model, its tokenizer and the libraries hold millions of objects that live as long as the
    # process: a full (gen 2) collection scanned them all and stalled every request for 220-250 ms
    # (measured at 1.5x load). Frozen, they are left out of every collection.
    freeze_alive()
    return loaded


def serve(settings: Settings) -> int:
    """Load the model and serve until stopped; the exit status."""
    from server.logs import configure_logging

    configure_logging(settings.log_level, log_format=settings.log_format)
    num_frontends = settings.num_frontends()
    if num_frontends > 1:
        from server.supervisor import Supervisor

        return Supervisor(settings, num_frontends).run()

    from server.api import create_app
    from server.engine.local import LocalEngine
    from server.serving import draining_server

    loaded = load_model(settings)
    if loaded is None:
        return 1
    engine_config = settings.engine_config()
    app = create_app(settings, lambda observer: LocalEngine(loaded, engine_config, observer), freeze_gc=True)
    server = draining_server(app, settings)
    server.run()
    return 0 if server.started else 3  # 3: start-up failed (uvicorn's own code for it)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m server`` and the ``exitserve`` script."""
    return serve(load_settings(argv))


if __name__ == "__main__":
    sys.exit(main())
