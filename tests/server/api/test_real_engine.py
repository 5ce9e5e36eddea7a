"""The API over the real Engine, with a tiny random model saved to and loaded from a tmp ModelStore."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from model_store.store import ModelStore
from server.api import create_app
from server.engine.local import LocalEngine as Engine
from server.engine.types import EngineObserver
from server.metrics import Registry
from tests.server.api.conftest import assert_error, make_settings
from tests.tiny_models import save_tiny_store

pytestmark = pytest.mark.model

NUM_LAYERS = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    save_tiny_store(root, num_layers=NUM_LAYERS, labels=("ham", "spam"), max_seq_length=16)
    return root


@pytest.fixture
async def client(store: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Registry]]:
    settings = make_settings(store=store, model="tiny", max_wait_ms=1.0, strict_length=True)
    loaded = ModelStore(settings.store).load(settings.model)
    registry = Registry()

    def factory(observer: EngineObserver) -> Engine:
        return Engine(loaded, settings.engine_config(), observer)

    app = create_app(settings, factory, registry=registry)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c, registry


async def test_classify_with_real_engine(client: tuple[httpx.AsyncClient, Registry]) -> None:
    c, registry = client
    assert (await c.get("/readyz")).status_code == 200
    texts = ["free money now", "meeting at noon", "click here to win", "see the report"]
    response = await c.post("/v1/classify", json={"inputs": texts, "speed": 0.5, "return_probs": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"], body["speed"], body["criterion"]) == (
        "tiny",
        "1",
        0.5,
        "normalized_entropy",
    )
    exit_layers = [r["exit_layer"] for r in body["results"]]
    for result in body["results"]:
        assert 1 <= result["exit_layer"] <= NUM_LAYERS
        assert result["num_layers_run"] == result["exit_layer"]
        assert result["label"] in ("ham", "spam")
        assert result["score"] == pytest.approx(max(result["probs"].values()), abs=1e-6)
        assert sum(result["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    for header in ("x-queue-time-ms", "x-inference-time-ms", "x-total-time-ms"):
        assert float(response.headers[header]) >= 0.0
    # the exit-layer histogram holds exactly the layers the engine answered from
    for k in range(1, NUM_LAYERS + 1):
        count = registry.get_sample_value("exitserve_exit_layer_bucket", {"model": "tiny", "le": f"{k}.0"})
        assert count == sum(1 for e in exit_layers if e <= k)
    # speed 1 exits at the first ramp; max_layers caps the depth
    fast = (await c.post("/v1/classify", json={"inputs": texts, "speed": 1.0})).json()
    assert [r["exit_layer"] for r in fast["results"]] == [1, 1, 1, 1]
    capped = (await c.post("/v1/classify", json={"inputs": texts, "speed": 0.0, "max_layers": 2})).json()
    assert [r["exit_layer"] for r in capped["results"]] == [2, 2, 2, 2]
    # strict length: an input over max_seq_length tokens is refused
    assert_error(await c.post("/v1/classify", json={"inputs": "word " * 40}), 413, "payload_too_large")


async def test_kserve_infer_with_real_engine(client: tuple[httpx.AsyncClient, Registry]) -> None:
    c, _ = client
    body = {
        "inputs": [
            {"name": "text", "shape": [2], "datatype": "BYTES", "data": ["free money", "lunch at one"]}
        ],
        "parameters": {"speed": 0.0},
    }
    response = await c.post("/v2/models/tiny/infer", json=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["exit_layer"]["data"] == [NUM_LAYERS, NUM_LAYERS]  # speed 0 never exits early
    assert all(label in ("ham", "spam") for label in outputs["label"]["data"])
