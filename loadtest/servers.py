"""Start and stop the servers a benchmark compares: subprocesses on free loopback ports.

Each server is started with its own log file, is ready when ``GET /readyz`` answers 200, and is
terminated (SIGTERM, then SIGKILL) when the benchmark leaves its ``with`` block.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server: ``argv`` may hold ``{port}`` and ``{host}``; so may ``env`` values."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 600.0
    preexec_fn: Callable[[], None] | None = None  # run in the child before exec (e.g. resource limits)


@dataclass(frozen=True)
class RunningServer:
    name: str
    url: str
    pid: int
    log_path: Path


class ServerStartError(RuntimeError):
    """The server exited or did not become ready in time; the message holds the tail of its log."""


def exitserve_spec(
    name: str, store: Path, model: str, version: str, batching: str, extra_args: Sequence[str] = ()
) -> ServerSpec:
    """``python -m server`` on the model store; ``batching`` is refill (early exit + refill) or shrink."""
    argv = [
        sys.executable,
        "-m",
        "server",
        "--store",
        str(store),
        "--model",
        model,
        "--model-version",
        version,
    ]
    argv += ["--host", "{host}", "--port", "{port}", "--batching", batching, "--log-level", "warning"]
    return ServerSpec(name=name, argv=[*argv, *extra_args])


def pipeline_spec(name: str, store: Path, model: str, version: str) -> ServerSpec:
    """The plain FastAPI + batch-size-1 baseline (``loadtest.baselines.pipeline_server``)."""
    argv = [sys.executable, "-m", "loadtest.baselines.pipeline_server", "--store", str(store)]
    argv += ["--model", model, "--version", version, "--host", "{host}", "--port", "{port}"]
    return ServerSpec(name=name, argv=argv)


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc), None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _tail(path: Path, num_chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-num_chars:]
    except OSError:
        return ""


@contextmanager
def running(spec: ServerSpec, log_dir: Path) -> Iterator[RunningServer]:
    """Start ``spec`` on a free loopback port, wait for /readyz, and always stop it on the way out."""
    port = free_port()
    values = {"host": LOOPBACK, "port": str(port)}
    argv = [arg.format(**values) for arg in spec.argv]
    env = {**os.environ, **{k: v.format(**values) for k, v in spec.env.items()}}
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}.log"
    url = f"http://{LOOPBACK}:{port}"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=spec.preexec_fn,
        )
    try:
        _wait_ready(process, url, log_path, spec.ready_timeout_s)
        yield RunningServer(name=spec.name, url=url, pid=process.pid, log_path=log_path)
    finally:
        stop(process)


def _wait_ready(process: subprocess.Popen[bytes], url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerStartError(
                    f"server exited with code {process.returncode}; log {log_path}:\n{_tail(log_path)}"
                )
            try:
                if client.get(f"{url}/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise ServerStartError(f"server not ready after {timeout_s:g} s; log {log_path}:\n{_tail(log_path)}")


def stop(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """SIGTERM (graceful drain), then SIGKILL; only this process group, which we started."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout_s)
    except ProcessLookupError:
        pass
