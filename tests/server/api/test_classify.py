"""POST /v1/classify: answers, defaults, options, timing headers."""

from __future__ import annotations

import time

import pytest

from model_store.criteria import Criterion
from tests.server.api.conftest import Served, make_settings, serve
from tests.server.api.fakes import FAKE_INFO, NUM_LAYERS


async def test_single_text(served: Served) -> None:
    response = await served.client.post("/v1/classify", json={"inputs": "claim your free prize now"})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "model": "fake",
        "version": "7",
        "speed": FAKE_INFO.default_speed,
        "criterion": "max_prob",
        "results": [
            {"label": "spam", "score": 0.9, "exit_layer": 4, "num_layers_run": 4, "truncated": False}
        ],
    }
    texts, options = served.engine.calls[0]
    assert texts == ["claim your free prize now"]
    assert options.criterion is Criterion.MAX_PROB
    assert options.speed == FAKE_INFO.default_speed
    assert options.max_layers is None
    assert options.deadline_s is None
    assert options.speed_is_default is True


async def test_batch_in_order_with_probs(served: Served) -> None:
    body = {"inputs": ["hi", "free stuff here", "x " * 80], "return_probs": True}
    response = await served.client.post("/v1/classify", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["label"] for r in results] == ["ham", "spam", "ham"]
    assert [r["exit_layer"] for r in results] == [1, 3, NUM_LAYERS]
    assert [r["truncated"] for r in results] == [False, False, True]
    assert results[0]["probs"] == {"ham": 0.8, "spam": 0.2}
    assert results[1]["probs"] == {"ham": 0.1, "spam": 0.9}


async def test_request_options_reach_the_engine(served: Served) -> None:
    before_s = time.monotonic()
    body = {
        "inputs": ["a b c d"],
        "speed": 0.5,
        "criterion": "patience",
        "max_layers": 2,
        "deadline_ms": 1500,
    }
    response = await served.client.post("/v1/classify", json=body)
    after_s = time.monotonic()
    assert response.status_code == 200, response.text
    assert response.json()["speed"] == 0.5
    assert response.json()["criterion"] == "patience"
    assert response.json()["results"][0]["exit_layer"] == 2
    options = served.engine.calls[0][1]
    assert (options.criterion, options.speed, options.max_layers) == (Criterion.PATIENCE, 0.5, 2)
    assert options.speed_is_default is False
    assert options.deadline_s is not None
    assert before_s + 1.5 <= options.deadline_s <= after_s + 1.5


async def test_default_deadline_from_settings() -> None:
    async with serve(make_settings(default_deadline_ms=250)) as s:
        before_s = time.monotonic()
        assert (await s.client.post("/v1/classify", json={"inputs": "hello"})).status_code == 200
        deadline_s = s.engine.calls[0][1].deadline_s
        assert deadline_s is not None
        assert before_s + 0.25 <= deadline_s <= time.monotonic() + 0.25


@pytest.mark.parametrize("speed", [0, 1, 0.0, 1.0])
async def test_speed_bounds_inclusive(served: Served, speed: float) -> None:
    response = await served.client.post("/v1/classify", json={"inputs": "hello", "speed": speed})
    assert response.status_code == 200, response.text
    assert response.json()["speed"] == float(speed)


async def test_timing_headers(served: Served) -> None:
    response = await served.client.post("/v1/classify", json={"inputs": "hello"})
    assert response.headers["x-queue-time-ms"] == "1.500"
    assert response.headers["x-inference-time-ms"] == "4.000"
    total_ms = float(response.headers["x-total-time-ms"])
    assert 0.0 <= total_ms < 5000.0


async def test_access_log_has_no_texts(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    await served.client.post("/v1/classify", json={"inputs": "my secret password is hunter2"})
    access = [r.getMessage() for r in caplog.records if r.name == "exitserve.access"]
    assert access == [access[0]] and access[0].startswith("POST /v1/classify 200 ")
    assert not any("hunter2" in r.getMessage() for r in caplog.records)
