"""Reliability against a real server process: bad input, overload at 2x capacity, schemathesis.

Set EXITSERVE_RELIABILITY_REPORT=<path> to write the measured figures as JSON (RELIABILITY.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtest.overload import OverloadOptions, measure
from model_store.store import ModelStore
from tests.e2e.conftest import ServerProcess, save_tiny_store, start_server

REPORT: dict[str, object] = {}
DEADLINE_MS = 1000


@pytest.fixture(scope="module", autouse=True)
def _write_report() -> Iterator[None]:
    yield
    path = os.environ.get("EXITSERVE_RELIABILITY_REPORT")
    if path and REPORT:
        Path(path).write_text(json.dumps(REPORT, indent=2) + "\n")


def test_one_megabyte_text_is_truncated_and_said_so(server: ServerProcess) -> None:
    text = "word " * 200_000  # 1 MB
    started = time.monotonic()
    response = httpx.post(f"{server.base_url}/v1/classify", json={"inputs": [text, "short"]}, timeout=30)
    assert response.status_code == 200, response.text
    assert [r["truncated"] for r in response.json()["results"]] == [True, False]
    assert time.monotonic() - started < 5  # cut by characters before tokenizing


def test_ten_thousand_inputs_refused_with_413(server: ServerProcess) -> None:
    response = httpx.post(f"{server.base_url}/v1/classify", json={"inputs": ["x"] * 10_000}, timeout=30)
    assert response.status_code == 413
    assert "10000 texts" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b'{"inputs": "a", "inputs": "b"}', 400),  # duplicate fields
        (b'{"inputs": "caf\xe9"}', 400),  # invalid UTF-8
        (b'{"inputs": ""}', 422),
        (b'{"inputs": "   \\n\\t"}', 422),
        (b'{"inputs": 5}', 422),
        (b'{"inputs": "a", "speed": -0.1}', 422),
        (b'{"inputs": "a", "speed": NaN}', 422),
        (b'{"inputs": "a", "speed": Infinity}', 422),
        (b'{"inputs": "a", "criterion": "vibes"}', 422),
    ],
)
def test_bad_input_gets_a_clear_4xx(server: ServerProcess, content: bytes, status: int) -> None:
    response = httpx.post(
        f"{server.base_url}/v1/classify", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


def test_unknown_model_404(server: ServerProcess) -> None:
    response = httpx.post(
        f"{server.base_url}/v2/models/nope/infer",
        json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]},
    )
    assert response.status_code == 404


# --- overload -------------------------------------------------------------------------------------

# ~100 tokens each: the soak model is compute-bound, so batching adds little and a closed-loop measure
# is the true capacity (a tiny model is bound by the HTTP front end and absorbs "2x" by batching).
WORDS = ["spam", "ham", "offer", "team", "lunch", "invoice", "meeting", "winner", "click", "free"]
TEXTS = [" ".join(random.Random(i).choice(WORDS) for _ in range(100)) for i in range(50)]


@pytest.mark.slow
@pytest.mark.serial
def test_overload_at_twice_capacity_keeps_goodput_and_loses_nothing(tmp_path: Path, frontends: int) -> None:
    """A bounded version of ``python -m loadtest overload`` (RELIABILITY.md) with the server's defaults:
    2x capacity, open loop, with 1 s deadlines and without deadlines."""
    save_tiny_store(tmp_path / "store", num_layers=6, hidden_size=256, max_seq_length=128)
    # The defaults, but for the number of front ends.
    server = start_server(tmp_path / "store", tmp_path / "server.log", frontends=frontends)
    # The recovery load is half the capacity measured before (the benchmark uses 0.7): this 2-core CI
    # machine is shared, and a neighbour's burst can halve the capacity for a second; at 0.7 that alone
    # is an overload, which is not what the recovery check is about (the overload's backlog clearing).
    options = OverloadOptions(
        factors=(2.0,),
        deadline_modes=(DEADLINE_MS, None),
        duration_s=6.0,
        capacity_s=4.0,
        recovery_s=3.0,
        recovery_factor=0.5,
        capacity_after=False,  # only the first capacity is checked against
    )
    try:
        figures = asyncio.run(measure(options, server.base_url, TEXTS))
    finally:
        code = server.terminate()
    REPORT[f"overload (frontends={frontends})"] = figures
    print(json.dumps(figures, indent=2))
    capacity_rps = figures["capacity"]["rps"]
    with_deadline, without_deadline = figures["scenarios"]
    for scenario in (with_deadline, without_deadline):
        assert set(scenario["statuses"]) <= {"200", "429", "503", "504"}, scenario
        assert scenario["lost"] == 0, scenario
        assert scenario["num_refused"] > 0, "2x capacity must be refused, not queued"
        assert scenario["refused_with_retry_after"], scenario
        # Refusals are fast (loose on a shared CI machine; RELIABILITY.md has the measured figures).
        assert scenario["refused_within_50ms"] >= 0.9, scenario
        assert scenario["recovery"]["back_to_normal_s"] is not None, scenario
        assert scenario["recovery"]["back_to_normal_s"] <= 2.0, scenario
    # Goodput: answers within the deadline, against the closed-loop capacity measured just before.
    assert with_deadline["goodput_rps"] >= 0.75 * capacity_rps, figures
    assert with_deadline["num_504"] + with_deadline["ok_late"] <= 0.1 * with_deadline["num_requests"], figures
    assert without_deadline["goodput_rps"] >= 0.75 * capacity_rps, figures
    assert code == 0


# --- schemathesis ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(server: ServerProcess, tmp_path: Path) -> None:
    junit = tmp_path / "schemathesis.xml"
    # 504 is this API's documented answer to a deadline that cannot be met (``deadline_ms``: 1 ms with
    # a text to tokenize and compute is one that schemathesis generates): not a server fault.
    config = tmp_path / "schemathesis.toml"
    config.write_text('[checks.not_a_server_error]\nexpected-statuses = ["2xx", "3xx", "4xx", "504"]\n')
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
        f"{server.base_url}/openapi.json",
        "--checks", "not_a_server_error", "--max-examples", "40", "--seed", "1",
        "--request-timeout", "30", "--no-color", "--report", "junit", "--report-junit-path", str(junit),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    xml = junit.read_text()
    num_operations = xml.count("<testcase")
    assert num_operations >= 10, xml[:500]
    summary = [ln for ln in out.stdout.splitlines() if re.search(r"\d+ (generated|passed|failed)|cases", ln)]
    REPORT["schemathesis"] = {"operations": num_operations, "summary": summary[-8:]}
    assert "<failure" not in xml and "<error" not in xml


def test_server_store_refuses_pickles(tmp_path: Path) -> None:
    store = save_tiny_store(tmp_path / "store")
    version_dir = store.version_dir("tiny")
    (version_dir / "pytorch_model.bin").write_bytes(b"\x80\x04")
    cmd = [
        sys.executable,
        "-m",
        "server",
        "--store",
        str(tmp_path / "store"),
        "--model",
        "tiny",
        "--port",
        "0",
    ]
    out = subprocess.run(
        cmd,
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert out.returncode != 0
    assert "pytorch_model.bin" in out.stderr + out.stdout


def test_store_fixture_is_the_tiny_model(tiny_store: ModelStore) -> None:
    assert tiny_store.list_models() == ["tiny"]
