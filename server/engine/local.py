"""The engine in one process: the core on its own thread, a client on the event loop, and the supervisor
that restarts a core which died or hung (its in-flight requests get 503 at once).

``python -m server --frontends N`` runs the core in a process of its own instead (``server/supervisor.py``);
the client and the core are the same classes, over ``ipc://`` instead of ``inproc://``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable

import zmq

from model_store.store import LoadedModel
from model_store.tokens import RowTokenizer
from server.engine.client import EngineClient
from server.engine.core import EngineCore, RunnerFactory, default_runner
from server.engine.errors import NotReadyError
from server.engine.info import expected_agreement, static_model_info
from server.engine.messages import CoreSocket
from server.engine.types import (
    ClassifyOptions,
    ClassifyResult,
    DisconnectWatch,
    EngineConfig,
    EngineObserver,
    Inputs,
    ModelInfo,
    NullObserver,
)

logger = logging.getLogger(__name__)
START_TIMEOUT_S = 60.0
_instances = itertools.count(1)


class LocalEngine:
    """Serves one model version in this process. Entry points for the event loop: ``start``,
    ``classify``, ``is_ready``, ``model_info``, ``stop`` (the ``ServingEngine`` contract)."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        observer: EngineObserver | None = None,
        *,
        runner_factory: RunnerFactory = default_runner,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._loaded = loaded
        self._observer: EngineObserver = observer or NullObserver()
        self._runner_factory = runner_factory
        self._clock = clock
        self._expected = expected_agreement(loaded.manifest)
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None  # made at start, ended at stop
        self._name = f"exitserve-core-{next(_instances)}"
        self.client = EngineClient(
            static_model_info(loaded.manifest, config.guard_sample_fraction),
            RowTokenizer(loaded.tokenizer, loaded.manifest.max_seq_length),
            config,
            self._observer,
        )
        self._epoch = 0
        self.core: EngineCore | None = None
        self._thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []  # every core thread started, hung ones included
        self._core_failed: BaseException | None = None
        self._stopping = False
        self._started = False
        self._watchdog: asyncio.Task[None] | None = None
        self.num_restarts = 0

    # --- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the core (it times a few steps first) and connect to it; ready when this returns."""
        if self._started:
            return
        self._started = True
        self._context = zmq.Context()
        await self._start_core()
        self._watchdog = asyncio.create_task(self._watch(), name="exitserve-watchdog")

    async def _start_core(self) -> None:
        self._epoch += 1
        epoch, address = self._epoch, f"inproc://{self._name}-{self._epoch}"
        ready = threading.Event()
        self._core_failed = None
        self._thread = threading.Thread(
            target=self._core_main, args=(epoch, address, ready), name="exitserve-engine", daemon=True
        )
        self._thread.start()
        self._threads.append(self._thread)
        await asyncio.to_thread(ready.wait, START_TIMEOUT_S)
        if self._core_failed is not None:
            raise RuntimeError("the engine core failed to start") from self._core_failed
        assert self._context is not None
        self.client.connect(epoch, address, self._context)
        give_up_s = time.monotonic() + START_TIMEOUT_S
        while not self.client.is_ready() and time.monotonic() < give_up_s and self._epoch == epoch:
            await asyncio.sleep(0.002)

    def _core_main(self, epoch: int, address: str, ready: threading.Event) -> None:
        try:
            core = EngineCore(
                self._loaded,
                self.config,
                self._observer,
                epoch=epoch,
                runner_factory=self._runner_factory,
                expected_agreement=self._expected,
                clock=self._clock,
            )
            assert self._context is not None
            socket = CoreSocket(self._context, address)
        except BaseException as e:
            self._core_failed = e
            ready.set()
            raise
        self.core = core
        ready.set()
        try:
            core.run(socket, lambda: self._stopping or self._epoch != epoch)
        except Exception:
            logger.exception("engine core crashed; the supervisor restarts it")
        finally:
            socket.close()

    async def _watch(self) -> None:
        """Restart the core when its thread died or one step ran longer than ``step_timeout_s``."""
        while not self._stopping:
            await asyncio.sleep(self.config.watchdog_interval_s)
            thread, core = self._thread, self.core
            if self._stopping or thread is None:
                continue
            try:
                if not thread.is_alive():
                    await self._restart("the engine thread died" if core else "the core failed to start")
                elif self._hung(core):
                    await self._restart(f"a step ran longer than {self.config.step_timeout_s:.1f} s")
            except Exception:  # the new core did not start: tried again at the next interval
                logger.exception("engine supervisor: the restarted core failed to start")

    def _hung(self, core: EngineCore | None) -> bool:
        busy_since_s = core.busy_since_s if core is not None else 0.0
        return bool(busy_since_s) and self._clock() - busy_since_s > self.config.step_timeout_s

    async def _restart(self, reason: str) -> None:
        logger.error("engine supervisor: %s; failing in-flight requests and restarting the core", reason)
        self.client.core_down()  # 503 at once for what was in flight
        self.core = None
        self.num_restarts += 1
        self._observer.engine_restarted()
        # A hung thread cannot be killed: its core sees the new epoch and leaves, should it ever return.
        await self._start_core()

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let in-flight ones finish (up to ``drain_timeout_s``), stop the core."""
        if self._stopping:
            return
        self.client.stop_accepting()
        give_up_s = self._clock() + drain_timeout_s
        while self.client.num_pending and self._clock() < give_up_s:
            await asyncio.sleep(0.01)
        # Leftovers get 503, and their rows are dropped (aborted, then the core stops).
        self.client.fail_all(NotReadyError("server shutting down: drain timeout reached"))
        await asyncio.sleep(0)
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for thread in self._threads:  # the current core, and any stale one that has come back
            await asyncio.to_thread(thread.join, 5.0 if thread is self._thread else 1.0)
        self.client.close()
        # Every socket is closed by now, unless a hung core thread still holds its own: then the context
        # is left to the process's exit (terminating it would wait for that thread forever).
        if self._context is not None and not any(t.is_alive() for t in self._threads):
            self._context.term()

    # --- the ServingEngine contract ------------------------------------------------------------------

    def is_ready(self) -> bool:
        thread = self._thread
        return not self._stopping and self.client.is_ready() and thread is not None and thread.is_alive()

    @property
    def model_info(self) -> ModelInfo:
        return self.client.model_info

    async def classify(
        self, texts: Inputs, options: ClassifyOptions, disconnect: DisconnectWatch | None = None
    ) -> ClassifyResult:
        return await self.client.classify(texts, options, disconnect)
