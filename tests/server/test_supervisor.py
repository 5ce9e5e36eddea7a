"""server/supervisor.py: what the engine core's forkserver imports before it forks a core."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from server.supervisor import CORE_PRELOAD

pytestmark = pytest.mark.unit


def test_every_preloaded_module_imports_and_none_brings_prometheus_client_or_the_http_stack() -> None:
    """multiprocessing's forkserver skips a preload module that fails to import, without a word: a
    misspelt name would only cost every restarted core its imports again. prometheus_client must not
    come with them (it picks its value class from PROMETHEUS_MULTIPROC_DIR when imported: the core
    imports it after the fork), nor the front ends' HTTP stack (no use in a core)."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {CORE_PRELOAD!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in ('prometheus_client', 'fastapi', 'starlette', 'uvicorn')"
        " if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout) == []
    assert {"torch", "transformers"} <= set(CORE_PRELOAD)


def test_a_core_that_cannot_be_forked_is_tried_again_and_then_the_server_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A killed forkserver reads as alive until it is reaped: the fork request then reads EOF. The next
    try starts a new forkserver; a core that never starts stops the server (exit 1), not a crash that
    leaves the front ends waiting."""
    import shutil

    from server import supervisor as supervisor_module
    from server.settings import load_settings

    failures = [2]

    class Forks:
        def __init__(self, **kwargs: object) -> None:
            pass

        def start(self) -> None:
            if failures[0]:
                failures[0] -= 1
                raise EOFError("unexpected EOF")

    monkeypatch.setattr(supervisor_module.time, "sleep", lambda _s: None)
    supervisor = supervisor_module.Supervisor(load_settings([]), 2)
    try:
        supervisor._core_mp = type("Context", (), {"Process": Forks})()  # type: ignore[assignment]
        assert supervisor._start_core() and failures == [0]
        assert not supervisor._failed
        failures[0] = supervisor_module.CORE_START_ATTEMPTS
        assert not supervisor._start_core()
        assert supervisor._failed and supervisor._stop_requested
    finally:
        shutil.rmtree(supervisor._runtime_dir, ignore_errors=True)
