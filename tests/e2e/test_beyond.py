"""The trust figure, best-effort deadlines and overload degradation over real HTTP (v1 and v2), against a
calibrated tiny model, with one and with two front ends."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from model_store.store import ModelStore
from tests.e2e.conftest import ServerProcess, start_server
from tests.tiny_models import save_tiny_store


@pytest.fixture(scope="module")
def calibrated_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return save_tiny_store(tmp_path_factory.mktemp("calibrated"), calibrated=True)


@pytest.fixture(scope="module")
def calibrated(
    calibrated_store: ModelStore, tmp_path_factory: pytest.TempPathFactory, frontends: int
) -> Iterator[ServerProcess]:
    running = start_server(
        calibrated_store.root,
        tmp_path_factory.mktemp("log") / "server.log",
        "--max-queue-wait-ms", "none", "--overload-max-accuracy-drop", "100",
        frontends=frontends,
    )  # fmt: skip
    yield running
    running.terminate()


def test_every_answer_states_its_calibrated_agreement_with_full_depth(
    calibrated: ServerProcess, calibrated_store: ModelStore
) -> None:
    table = calibrated_store.load("tiny").manifest.calibration
    assert table is not None and table.agreement_table is not None
    texts = ["free money now", "team lunch agenda", "invoice", "click winner offer now now"]
    for speed in (0.0, 0.5, 1.0):
        reply = httpx.post(f"{calibrated.base_url}/v1/classify", json={"inputs": texts, "speed": speed})
        assert reply.status_code == 200, reply.text
        for row in reply.json()["results"]:
            stated = table.agreement_table.agreement(row["exit_layer"], row["score"])
            assert row["full_depth_agreement"] == pytest.approx(stated, abs=1e-6)
            if row["exit_layer"] == 4:
                assert row["full_depth_agreement"] == 1.0
            assert "deadline_exit" not in row  # only on answers cut by their deadline
    v2 = httpx.post(
        f"{calibrated.base_url}/v2/models/tiny/infer",
        json={
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": texts[:2]}],
            "outputs": [{"name": "exit_layer"}, {"name": "score"}, {"name": "full_depth_agreement"}],
            "parameters": {"speed": 1.0},
        },
    )
    assert v2.status_code == 200, v2.text
    outputs = {o["name"]: o["data"] for o in v2.json()["outputs"]}
    for layer, score, stated in zip(
        outputs["exit_layer"], outputs["score"], outputs["full_depth_agreement"], strict=True
    ):
        assert stated == pytest.approx(table.agreement_table.agreement(layer, score), abs=1e-4)


def test_best_effort_needs_a_deadline_and_is_answered_before_it(calibrated: ServerProcess) -> None:
    url = f"{calibrated.base_url}/v1/classify"
    refused = httpx.post(url, json={"inputs": "free money", "on_deadline": "best_effort"})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "on_deadline"
    bad = httpx.post(url, json={"inputs": "x", "on_deadline": "later", "deadline_ms": 100})
    assert bad.status_code == 422
    ok = httpx.post(
        url, json={"inputs": ["free money", "lunch"], "on_deadline": "best_effort", "deadline_ms": 5000}
    )
    assert ok.status_code == 200, ok.text  # idle: nothing is cut
    assert all("deadline_exit" not in row for row in ok.json()["results"])
    v2 = httpx.post(
        f"{calibrated.base_url}/v2/models/tiny/infer",
        json={
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["free money"]}],
            "parameters": {"on_deadline": "best_effort", "deadline_ms": 5000},
        },
    )
    assert v2.status_code == 200, v2.text
    outputs = {o["name"]: o["data"] for o in v2.json()["outputs"]}
    assert outputs["deadline_exit"] == [False]  # sent by default for best-effort requests


def test_degradation_settings_are_validated_and_exposed(calibrated: ServerProcess) -> None:
    url = f"{calibrated.base_url}/v1/classify"
    for bad in (-1, 101, "1"):
        reply = httpx.post(url, json={"inputs": "x", "overload_max_accuracy_drop": bad})
        assert reply.status_code == 422, (bad, reply.text)
    idle = httpx.post(url, json={"inputs": "free money", "speed": 0.0, "overload_max_accuracy_drop": 2.0})
    body = idle.json()
    assert idle.status_code == 200 and "degraded" not in body and body["speed"] == 0.0  # idle: as asked
    metrics = httpx.get(f"{calibrated.base_url}/metrics").text
    # A request that allows degradation sets the effective speed of its asked-speed bucket.
    assert re.search(r'^exitserve_effective_speed\{bucket="0.0",model="tiny"\} 0.0$', metrics, re.M), metrics
    assert re.search(r"^exitserve_trust_stated_agreement\{", metrics, re.M)
