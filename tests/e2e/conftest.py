"""A real server process (``python -m server``) on a free loopback port, over a tiny model store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest

from model_store.store import ModelStore
from tests.tiny_models import save_tiny_store

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    log_file: IO[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout_s: float = 30.0) -> int:
        """The exit code of a server already sent SIGTERM. Not ``terminate``: a second SIGTERM can land
        after uvicorn has put back the default handler, while the process exits, and kill it (-15)."""
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            self.log_file.close()

    def terminate(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            self.log_file.close()


def start_server(
    store_root: Path,
    log_path: Path,
    *extra_args: str,
    model: str = "tiny",
    preexec_fn: Callable[[], None] | None = None,
    frontends: int = 1,
) -> ServerProcess:
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    log = log_path.open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "--store",
            str(store_root),
            "--model",
            model,
            "--port",
            str(port),
            "--frontends",
            str(frontends),
            *extra_args,
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=preexec_fn,
    )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path, log)
    give_up_s = time.monotonic() + 90  # the core imports torch, loads its model (slow on a busy machine)
    while time.monotonic() < give_up_s:
        if process.poll() is not None:
            log.close()
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.terminate()
    raise RuntimeError(f"server not ready in 90 s:\n{server.log()}")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return save_tiny_store(tmp_path_factory.mktemp("store"), default_speed=0.5)


# Every e2e test runs against one process (engine core as a thread) and against two front-end processes
# feeding an engine-core process (server/supervisor.py).
FRONTENDS = (1, 2)


@pytest.fixture(scope="session", params=FRONTENDS, ids=lambda n: f"frontends={n}")
def frontends(request: pytest.FixtureRequest) -> int:
    return int(request.param)


# One server per front-end count for the whole session (starting one costs seconds; tests that need other
# settings start their own). Tests on it compare metrics before and after, never absolute counts.
@pytest.fixture(scope="session")
def _shared_servers() -> Iterator[dict[int, ServerProcess]]:
    """The shared servers started so far, by front-end count, stopped at the end of the session. Kept
    here rather than in ``server`` itself: pytest keeps one value of a parametrized fixture at a time,
    so each change of ``frontends`` (at every test file, when a worker runs files one by one) would stop
    one server and start the other."""
    running: dict[int, ServerProcess] = {}
    yield running
    for one in running.values():
        one.terminate()


@pytest.fixture(scope="session")
def server(
    tiny_store: ModelStore,
    tmp_path_factory: pytest.TempPathFactory,
    frontends: int,
    _shared_servers: dict[int, ServerProcess],
) -> ServerProcess:
    if frontends not in _shared_servers:
        # Tests on this server check answers, not admission (tests/e2e/test_reliability.py and
        # test_admission.py do): a burst on a slow CI machine must not be refused by the queue-wait bound.
        _shared_servers[frontends] = start_server(
            tiny_store.root,
            tmp_path_factory.mktemp("log") / "server.log",
            "--max-batch-size", "8", "--max-queue-wait-ms", "none",
            frontends=frontends,
        )  # fmt: skip
    return _shared_servers[frontends]
