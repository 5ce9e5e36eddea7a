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
