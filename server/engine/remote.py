"""A front end's engine when the core runs in a process of its own (``--frontends`` > 1).

The supervisor publishes which core generation serves (``epoch``, 0 while none does) in shared memory.
One watcher per front end (not per request) reads it every ``WATCH_INTERVAL_S``: a core that died or was
killed for hanging turns its in-flight requests into 503s here within that interval, and a new one is
connected as soon as it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

import zmq

from server.engine.client import EngineClient
from server.engine.errors import NotReadyError
from server.engine.types import ClassifyOptions, ClassifyResult, DisconnectWatch, Inputs, ModelInfo

WATCH_INTERVAL_S = 0.05


class RemoteEngine:
    """The ``ServingEngine`` contract over an ``EngineClient`` of a core in another process."""

    def __init__(
        self,
        client: EngineClient,
        address: str,
        current_epoch: Callable[[], int],
        on_orphaned: Callable[[], None] | None = None,
        supervisor_pid: int | None = None,
    ) -> None:
        """``on_orphaned`` is called once the process ``supervisor_pid`` (this one's parent if None) is
        no longer this process's parent: it has ended. A front end is given the supervisor's pid: read
        from ``getppid`` at start-up, it is already someone else's if the supervisor ended meanwhile."""
        self.client = client
        self._address = address
        self._current_epoch = current_epoch
        self._on_orphaned = on_orphaned
        self._parent_pid = os.getppid() if supervisor_pid is None else supervisor_pid
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        self._context = zmq.Context()
        self._follow()
        self._watcher = asyncio.create_task(self._watch(), name="exitserve-core-watch")

    def _follow(self) -> None:
        epoch = self._current_epoch()
        if epoch == self.client.epoch:
            return
        if epoch == 0:
            self.client.core_down()
        else:
            assert self._context is not None
            self.client.connect(epoch, self._address, self._context)

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(WATCH_INTERVAL_S)
            self._follow()
            if os.getppid() != self._parent_pid and self._on_orphaned is not None:
                self._on_orphaned()  # the supervisor is gone: drain and exit
                self._on_orphaned = None

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let this front end's in-flight ones finish (up to ``drain_timeout_s``);
        the supervisor stops the core once every front end has exited."""
        if self._stopping:
            return
        self.client.stop_accepting()
        loop = asyncio.get_running_loop()
        give_up_s = loop.time() + drain_timeout_s
        while self.client.num_pending and loop.time() < give_up_s:
            await asyncio.sleep(0.01)
        self.client.fail_all(NotReadyError("server shutting down: drain timeout reached"))
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        self.client.close()
        if self._context is not None:
            self._context.term()

    def is_ready(self) -> bool:
        return not self._stopping and self.client.is_ready()

    @property
    def model_info(self) -> ModelInfo:
        return self.client.model_info

    async def classify(
        self, texts: Inputs, options: ClassifyOptions, disconnect: DisconnectWatch | None = None
    ) -> ClassifyResult:
        return await self.client.classify(texts, options, disconnect)
