"""GET /healthz, /readyz, /v1/models, OpenAPI docs; readiness through start-up and draining."""

from __future__ import annotations

import gc

import pytest

from tests.server.api.conftest import Served, assert_error, serve
from tests.server.api.fakes import CALIBRATION, FakeEngine


async def test_health_and_ready(served: Served) -> None:
    assert (await served.client.get("/healthz")).json() == {"status": "ok"}
    response = await served.client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


async def test_not_ready_until_started_and_while_draining() -> None:
    async with serve(start=False) as s:
        assert (await s.client.get("/healthz")).status_code == 200
        assert_error(await s.client.get("/readyz"), 503, "not_ready")
    async with serve() as s:
        assert (await s.client.get("/readyz")).status_code == 200
        s.app.state.exitserve.begin_drain()  # what SIGTERM does first
        assert assert_error(await s.client.get("/readyz"), 503, "not_ready") == "draining"
        assert (await s.client.get("/healthz")).status_code == 200
    # lifespan shutdown stopped the engine, with the configured drain timeout
    assert s.engine.stopped and s.engine.drain_timeout_s == 30.0


async def test_engine_not_ready_means_not_ready(served: Served) -> None:
    served.engine.stopped = True
    assert_error(await served.client.get("/readyz"), 503, "not_ready")


async def test_models_lists_calibration(served: Served) -> None:
    response = await served.client.get("/v1/models")
    assert response.status_code == 200
    (model,) = response.json()["models"]
    assert model["name"] == "fake" and model["version"] == "7"
    assert model["num_layers"] == 4
    assert model["labels"] == ["ham", "spam"]
    assert model["default_criterion"] == "max_prob" and model["default_speed"] == 0.25
    assert model["criteria"] == ["normalized_entropy", "entropy", "max_prob", "patience"]
    assert model["ready"] is True
    assert model["calibration"] == CALIBRATION


async def test_openapi_and_docs(served: Served) -> None:
    spec = (await served.client.get("/openapi.json")).json()
    classify = spec["paths"]["/v1/classify"]["post"]
    assert classify["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ClassifyRequest"
    )
    assert {"413", "422", "429", "503", "504"} <= set(classify["responses"])
    assert "/v2/models/{name}/infer" in spec["paths"]
    docs = await served.client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


@pytest.mark.parametrize("freeze_gc", [False, True])
async def test_a_served_process_freezes_what_is_alive_once_started(
    freeze_gc: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m server`` and every front-end process freeze their objects out of later collections once
    started, engine included; an app built without ``freeze_gc`` (tests, embedding) leaves ``gc`` alone."""
    calls: list[str] = []
    start = FakeEngine.start

    async def recorded_start(self: FakeEngine) -> None:
        calls.append("engine started")
        await start(self)

    monkeypatch.setattr(FakeEngine, "start", recorded_start)
    monkeypatch.setattr(gc, "collect", lambda *_: calls.append("collect") or 0)
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    async with serve(start=False, freeze_gc=freeze_gc):
        assert calls == []  # nothing while the app is built
    async with serve(freeze_gc=freeze_gc) as s:
        assert (await s.client.get("/readyz")).status_code == 200
    assert calls == (["engine started", "collect", "freeze"] if freeze_gc else ["engine started"])
