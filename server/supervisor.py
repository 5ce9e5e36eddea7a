"""``--frontends N`` (N > 1): N HTTP front-end processes on one port, one engine-core process, and this
process supervising them.

- The supervisor binds the port once; every front end accepts on that socket (uvicorn's own way of
  running workers). Each front end parses HTTP, validates, tokenizes and awaits replies, with its own
  interpreter: the front ends' Python no longer competes with the core's for one interpreter lock.
- The core loads the model and serves every front end over one ``ipc://`` socket
  (``server/engine/messages.py``). It publishes ``busy_since_s`` in shared memory; the supervisor kills
  it when one step runs past ``step_timeout_s``, and restarts it when it dies (``SIGKILL`` included).
  Meanwhile ``epoch`` (shared memory) is 0: every front end answers its in-flight requests 503 at once,
  ``/readyz`` says 503, and the new core is connected as soon as it serves.
- Each core is forked from a process that imported torch, transformers and the engine once (multiprocessing's
  forkserver, started with the first core, before any thread or device exists in it): a restarted core
  pays for its model's load and calibration, not the ~4 s of imports again (RELIABILITY.md, "A core's
  restart"). The front ends are spawned: they import neither.
- Metrics: prometheus_client's multiprocess mode (``server/metrics.py``); any front end's ``/metrics``
  shows the sum over every process.
- SIGTERM / SIGINT: every front end drains (``/readyz`` 503, in-flight requests answered), then the core
  stops; exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from types import FrameType
from typing import Any

from server.settings import Settings

logger = logging.getLogger("exitserve.supervisor")
CORE_START_TIMEOUT_S = 600.0  # loading and checking a model, then timing a few steps
STOP_GRACE_S = 5.0
# A process that dies this soon after its start, this many times in a row, will not come up (a store or
# tokenizer gone bad): the supervisor stops with exit 1 instead of restarting it forever.
EARLY_EXIT_S = 10.0
MAX_EARLY_EXITS = 3
CORE_START_ATTEMPTS = 20  # 0.1 s apart
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# What the forkserver imports once, for every core it forks (none of it imports prometheus_client, whose
# value class is chosen at import from PROMETHEUS_MULTIPROC_DIR: the core imports it after the fork).
CORE_PRELOAD = ["torch", "transformers", "zmq", "model_store.store", "server.engine.core"]


def _set_value(value: Any, new: float) -> None:
    value.value = new


def _die_with_parent() -> None:
    """End this core when its parent, the forkserver, ends, and let the forkserver end with the supervisor.

    The supervisor learns of a core's end through the forkserver: if the forkserver were killed (the OOM
    killer, an operator), the supervisor would take the core for ended and start another while this one
    lived on, orphaned: so SIGKILL when the parent ends (``PR_SET_PDEATHSIG``, Linux). The forkserver
    itself exits once every holder of its "alive" pipe has closed it: the supervisor and each process
    it forked (given a copy so that it could fork in turn; a core never does). Closed here, a killed
    supervisor ends the forkserver, and so this core (the front ends notice on their own)."""
    import ctypes
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if alive_fd is not None:
        with contextlib.suppress(OSError):
            os.close(alive_fd)
        server._forkserver_alive_fd = None  # type: ignore[union-attr]  # not None: it held the fd
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it ended before the request took effect
        os._exit(1)


def core_main(settings: Settings, address: str, epoch_value: Any, busy_value: Any, epoch: int) -> None:
    """The engine-core process: load the model, serve front ends over ``address`` until SIGTERM."""
    _die_with_parent()
    import zmq

    from server.__main__ import load_model
    from server.engine.core import EngineCore
    from server.engine.info import expected_agreement
    from server.engine.messages import CoreSocket
    from server.logs import configure_logging
    from server.metrics import ServerMetrics

    configure_logging(settings.log_level, f"core {epoch}", settings.log_format)
    stopping = False

    def stop(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process; the supervisor decides
    loaded = load_model(settings)
    if loaded is None:
        raise SystemExit(1)
    manifest = loaded.manifest
    metrics = ServerMetrics(settings.model, multiprocess=True)
    metrics.bind_model(manifest.num_layers, manifest.default_speed)
    if epoch > 1:
        metrics.engine_restarted()
    core = EngineCore(
        loaded,
        settings.engine_config(),
        metrics,
        epoch=epoch,
        expected_agreement=expected_agreement(manifest),
        on_busy=lambda since_s: _set_value(busy_value, since_s),
    )
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    core_socket = CoreSocket(context, address)
    epoch_value.value = epoch  # serving: front ends connect
    logger.info(
        "engine core %d (pid %d) serving %s version %s", epoch, os.getpid(), manifest.name, manifest.version
    )
    try:
        core.run(core_socket, lambda: stopping)
    finally:
        core_socket.close()
        context.term()


def frontend_main(
    settings: Settings,
    sockets: list[socket.socket],
    address: str,
    epoch_value: Any,
    index: int,
    supervisor_pid: int,
) -> None:
    """One HTTP front-end process: uvicorn on the shared socket, an EngineClient of the core."""
    from model_store.layout import StoreLayout, read_manifest
    from model_store.tokens import TOKENIZER_FILE, RowTokenizer, load_tokenizer_file
    from server.api import create_app
    from server.engine.client import EngineClient
    from server.engine.info import static_model_info
    from server.engine.remote import RemoteEngine
    from server.engine.types import EngineObserver
    from server.logs import configure_logging
    from server.serving import draining_server

    configure_logging(settings.log_level, f"front end {index}", settings.log_format)
    # The manifest and the tokenizer only: the core loaded and checked the whole version, and the front
    # end needs neither torch nor transformers (a smaller process, started in about a second).
    version_dir = StoreLayout(settings.store).version_dir(settings.model, settings.model_version)
    manifest = read_manifest(version_dir)
    tokenizer: Any
    if (version_dir / TOKENIZER_FILE).is_file():
        tokenizer = load_tokenizer_file(version_dir)
    else:  # a store saved without tokenizer.json: transformers builds the fast tokenizer (slower start)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(version_dir))
    engine_config = settings.engine_config()
    info = static_model_info(manifest, engine_config.guard_sample_fraction)
    row_tokenizer = RowTokenizer(tokenizer, manifest.max_seq_length)
    holder: dict[str, Any] = {}

    def build(observer: EngineObserver) -> RemoteEngine:
        client = EngineClient(info, row_tokenizer, engine_config, observer, settings.num_frontends())
        return RemoteEngine(
            client,
            address,
            lambda: int(epoch_value.value),
            on_orphaned=orphaned,
            supervisor_pid=supervisor_pid,
        )

    def orphaned() -> None:
        logger.error("the supervisor is gone; draining and exiting")
        server = holder.get("server")
        if server is not None:
            server.handle_exit(signal.SIGTERM, None)

    app = create_app(settings, build, multiprocess_metrics=True, freeze_gc=True)
    server = draining_server(app, settings)
    holder["server"] = server
    server.run(sockets=sockets)


class Supervisor:
    """Starts, watches and stops the core and the front ends (see the module docstring)."""

    def __init__(self, settings: Settings, num_frontends: int) -> None:
        self.settings = settings
        self.num_frontends = num_frontends
        self._mp = multiprocessing.get_context("spawn")
        self._core_mp = multiprocessing.get_context("forkserver")
        self._core_mp.set_forkserver_preload(CORE_PRELOAD)
        self._runtime_dir = Path(tempfile.mkdtemp(prefix="exitserve-"))
        self._address = f"ipc://{self._runtime_dir / 'core.sock'}"
        self._epoch: Synchronized[int] = self._mp.Value("q", 0, lock=False)  # type: ignore[assignment]
        self._busy: Synchronized[float] = self._mp.Value("d", 0.0, lock=False)  # type: ignore[assignment]
        self._core: BaseProcess | None = None
        self._core_epoch = 0
        self._frontends: dict[int, BaseProcess] = {}
        self._socket: socket.socket | None = None
        self._stop_requested = False
        self._started_s: dict[str, float] = {}  # process name -> when it was started
        self._early_exits: dict[str, int] = {}  # role -> early exits in a row
        self._failed = False

    def run(self) -> int:
        metrics_dir = self._runtime_dir / "metrics"
        metrics_dir.mkdir()
        # Read by prometheus_client when the children import it (the front ends are spawned; the forkserver
        # that forks each core starts with the first core, after this, and does not import it).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        try:
            try:
                self._socket = self._bind()
            except OSError as e:
                logger.error("cannot listen on %s:%d: %s", self.settings.host, self.settings.port, e)
                return 1
            # The front ends start while the core loads the model (they answer /readyz 503 meanwhile).
            if not self._start_core():
                return 1
            for index in range(self.num_frontends):
                self._start_frontend(index)
            if not self._wait_core_ready():
                self._shutdown()
                return 1
            logger.info(
                "serving on %s:%d with %d front ends and one engine core",
                self.settings.host,
                self._socket.getsockname()[1],
                self.num_frontends,
            )
            self._watch()
            return self._shutdown()
        finally:
            if self._socket is not None:
                self._socket.close()
            shutil.rmtree(self._runtime_dir, ignore_errors=True)

    def _request_stop(self, sig: int, frame: FrameType | None) -> None:
        self._stop_requested = True

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.settings.host, self.settings.port))
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock

    def _start_core(self) -> bool:
        """Start the next core; False (and the server stops, exit 1) if it cannot be started."""
        self._core_epoch += 1
        self._busy.value = 0.0
        for attempt in range(1, CORE_START_ATTEMPTS + 1):
            process = self._core_mp.Process(
                target=core_main,
                args=(self.settings, self._address, self._epoch, self._busy, self._core_epoch),
                name=f"exitserve-core-{self._core_epoch}",
            )
            try:
                process.start()
            except (EOFError, OSError) as e:
                # A killed forkserver reads as alive until it is reaped: multiprocessing then asks it for
                # a fork and reads EOF. Reaped at the next try, it is started again.
                logger.warning("engine core %d not started (%s: %s; try %d)", self._core_epoch,
                               type(e).__name__, e, attempt)  # fmt: skip
                time.sleep(0.1)
                continue
            self._core = process
            self._started_s["core"] = time.monotonic()
            return True
        logger.error("engine core %d could not be started; stopping", self._core_epoch)
        self._failed = True
        self._stop_requested = True
        return False

    def _wait_core_ready(self) -> bool:
        """Wait for the first core to serve; False if it exited, a stop was asked for or it took too long."""
        process = self._core
        assert process is not None
        give_up_s = time.monotonic() + CORE_START_TIMEOUT_S
        while self._epoch.value != self._core_epoch:
            if not process.is_alive() or self._stop_requested or time.monotonic() > give_up_s:
                logger.error("the engine core did not start (exit code %s)", process.exitcode)
                self._terminate(process)
                return False
            process.join(0.05)
        return True

    def _start_frontend(self, index: int) -> None:
        process = self._mp.Process(
            target=frontend_main,
            args=(self.settings, [self._socket], self._address, self._epoch, index, os.getpid()),
            name=f"exitserve-frontend-{index}",
        )
        process.start()
        self._frontends[index] = process
        self._started_s[f"front end {index}"] = time.monotonic()

    def _watch(self) -> None:
        interval_s = self.settings.engine_config().watchdog_interval_s
        while not self._stop_requested:
            core = self._core
            assert core is not None
            sentinels = [core.sentinel, *(p.sentinel for p in self._frontends.values())]
            wait(sentinels, timeout=interval_s)
            if self._stop_requested:
                return
            busy_since_s = self._busy.value
            if not core.is_alive():
                if self._gave_up("core"):
                    return
                self._restart_core(f"the engine core exited (code {core.exitcode})")
            elif busy_since_s and time.monotonic() - busy_since_s > self.settings.step_timeout_s:
                core.kill()
                core.join(STOP_GRACE_S)
                self._restart_core(f"a step ran longer than {self.settings.step_timeout_s:.1f} s")
            for index, process in list(self._frontends.items()):
                if not process.is_alive() and not self._stop_requested:
                    if self._gave_up(f"front end {index}"):
                        return
                    logger.error("front end %d exited (code %s); restarting it", index, process.exitcode)
                    _mark_dead(process)
                    self._start_frontend(index)

    def _gave_up(self, role: str) -> bool:
        """Count an exit soon after start; True (and stop serving) after ``MAX_EARLY_EXITS`` in a row."""
        if time.monotonic() - self._started_s.get(role, 0.0) > EARLY_EXIT_S:
            self._early_exits[role] = 0
            return False
        self._early_exits[role] = self._early_exits.get(role, 0) + 1
        if self._early_exits[role] < MAX_EARLY_EXITS:
            return False
        logger.error("%s exited within %.0f s of its start %d times in a row; stopping", role, EARLY_EXIT_S,
                     MAX_EARLY_EXITS)  # fmt: skip
        self._failed = True
        return True

    def _restart_core(self, reason: str) -> None:
        logger.error("supervisor: %s; front ends fail its requests with 503, restarting it", reason)
        self._epoch.value = 0
        if self._core is not None:
            _mark_dead(self._core)
        self._start_core()

    def _shutdown(self) -> int:
        logger.info("stopping: draining %d front ends", len(self._frontends))
        for process in self._frontends.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        drain_s = self.settings.drain_timeout_s + 2 + STOP_GRACE_S
        give_up_s = time.monotonic() + drain_s
        codes = []
        for process in self._frontends.values():
            process.join(max(0.0, give_up_s - time.monotonic()))
            if process.is_alive():
                logger.error("%s did not drain in %.0f s; killed", process.name, drain_s)
                process.kill()
                process.join()
            codes.append(process.exitcode)
            _mark_dead(process)
        if self._core is not None:
            self._terminate(self._core)
            _mark_dead(self._core)
        return 0 if all(code == 0 for code in codes) and not self._failed else 1

    @staticmethod
    def _terminate(process: BaseProcess) -> None:
        if process.is_alive():
            process.terminate()
            process.join(STOP_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join()


def _mark_dead(process: BaseProcess) -> None:
    from server.metrics import mark_process_dead

    if process.pid is not None:
        with contextlib.suppress(OSError):
            mark_process_dead(process.pid)
