"""The load generator as against a user's deployment: API key, batched inputs, the v2 route (on a live
loopback server with an API key; a remote URL needs --allow-remote, tested in tests/loadtest)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from model_store.store import ModelStore
from tests.e2e.conftest import REPO, ServerProcess, start_server

API_KEY = "loadgen-key-5e1f9a"


@pytest.fixture(scope="module")
def keyed(tiny_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log: Path = tmp_path_factory.mktemp("log") / "server.log"
    running = start_server(tiny_store.root, log, "--api-key", API_KEY, "--max-queue-wait-ms", "none")
    yield running
    running.terminate()


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_batched_runs_with_an_api_key_on_both_routes(
    keyed: ServerProcess, tmp_path: Path, protocol: str
) -> None:
    dataset = tmp_path / "data.jsonl"
    dataset.write_text(
        "\n".join(json.dumps({"text": f"message {i} free lunch", "label": "a"}) for i in range(12)) + "\n"
    )
    out = tmp_path / "run.json"
    argv = [sys.executable, "-m", "loadtest", "run", "--url", keyed.base_url, "--dataset", str(dataset)]
    argv += ["--api-key", API_KEY, "--inputs-per-request", "4", "--protocol", protocol, "--max-requests", "6"]
    argv += ["--concurrency", "2", "--warmup", "0", "--quiet", "--out", str(out), "--speeds", "0.5"]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    summary = document["results"]
    assert summary["num_ok"] == 6 and summary["errors_by_status"] == {}
    assert summary["num_scored"] == 24  # 6 requests x 4 labelled inputs
    assert sum(summary["exit_layer_histogram"].values()) == 24
    assert summary["rows_per_s"] == pytest.approx(4 * summary["throughput_rps"])
    assert API_KEY not in out.read_text()  # the key is never written out
    assert document["settings"]["protocol"] == protocol and document["settings"]["api_key"] == "(set)"


def test_a_wrong_key_is_counted_as_401s(keyed: ServerProcess, tmp_path: Path) -> None:
    dataset = tmp_path / "data.jsonl"
    dataset.write_text(json.dumps({"text": "hello", "label": "a"}) + "\n")
    out = tmp_path / "run.json"
    argv = [sys.executable, "-m", "loadtest", "run", "--url", keyed.base_url, "--dataset", str(dataset)]
    argv += ["--api-key", "wrong", "--max-requests", "3", "--warmup", "0", "--quiet", "--out", str(out)]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["results"]["errors_by_status"] == {"401": 3}
