"""TEI's /predict, /info, /health and the Hugging Face inference API's POST / (fake engine)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.server.api.conftest import Served, serve
from tests.server.api.fakes import expected_exit_layer

HAM, SPAM = {"label": "ham", "score": 0.8}, {"label": "spam", "score": 0.9}


async def test_predict_single_and_batch_in_teis_shape(served: Served) -> None:
    one = await served.client.post("/predict", json={"inputs": "free money", "truncate": True})
    assert one.status_code == 200, one.text
    assert one.json() == [{"label": "spam", "score": 0.9}, {"label": "ham", "score": 0.1}]
    many = await served.client.post("/predict", json={"inputs": ["free", "lunch?"], "truncate": True})
    assert many.json() == [
        [{"label": "spam", "score": 0.9}, {"label": "ham", "score": 0.1}],
        [{"label": "ham", "score": 0.8}, {"label": "spam", "score": 0.2}],
    ]
    assert many.headers["x-queue-time-ms"]


async def test_predict_takes_exitserve_knobs_and_reports_the_exit_layer(served: Served) -> None:
    body = {
        "inputs": "free",
        "truncate": True,
        "speed": 0.7,
        "criterion": "max_prob",
        "return_exit_layer": True,
    }
    reply = await served.client.post("/predict", json=body)
    assert reply.status_code == 200, reply.text
    assert [entry["exit_layer"] for entry in reply.json()] == [expected_exit_layer("free")] * 2
    options = served.engine.calls[0][1]
    assert (options.speed, str(options.criterion), options.refuse_truncated) == (0.7, "max_prob", False)


async def test_predict_without_truncate_refuses_what_would_be_cut(served: Served) -> None:
    await served.client.post("/predict", json={"inputs": "short"})
    assert served.engine.calls[-1][1].refuse_truncated  # TEI's default: truncate false


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"inputs": [["premise", "hypothesis"]]}, "inputs[0]"),
        ({"inputs": "x", "raw_scores": True}, "raw_scores"),
        ({"inputs": "x", "truncation_direction": "Left"}, "truncation_direction"),
        ({"inputs": "x", "normalize": True}, "normalize"),
        ({"inputs": ""}, "inputs[0]"),
    ],
)
async def test_predict_refuses_what_it_cannot_honour_in_teis_error_shape(
    served: Served, body: dict[str, Any], field: str
) -> None:
    reply = await served.client.post("/predict", json=body)
    assert reply.status_code == 422, reply.text
    error = reply.json()
    assert set(error) == {"error", "error_type", "field"} and isinstance(error["error"], str)
    assert error["field"] == field and error["error_type"] == "invalid_request"
    assert served.engine.calls == []


async def test_hub_route_answers_a_list_per_input_with_top_k(served: Served) -> None:
    reply = await served.client.post("/", json={"inputs": "free money", "parameters": {"top_k": 1}})
    assert reply.status_code == 200, reply.text
    assert reply.json() == [[{"label": "spam", "score": 0.9}]]
    both = await served.client.post("/", json={"inputs": ["free", "hi"], "parameters": {"speed": 0.2}})
    assert both.json() == [[SPAM, {"label": "ham", "score": 0.1}], [HAM, {"label": "spam", "score": 0.2}]]
    assert served.engine.calls[-1][1].speed == 0.2
    refused = await served.client.post(
        "/", json={"inputs": "x", "parameters": {"function_to_apply": "sigmoid"}}
    )
    assert refused.status_code == 422 and refused.json()["field"] == "parameters.function_to_apply"


async def test_info_and_health(served: Served) -> None:
    info = (await served.client.get("/info")).json()
    assert info["model_id"] == "fake" and info["model_sha"] == "7"
    assert info["model_type"]["classifier"]["id2label"] == {"0": "ham", "1": "spam"}
    assert info["max_client_batch_size"] > 0 and info["version"]
    health = await served.client.get("/health")
    assert health.status_code == 200 and health.content == b""
    async with serve(start=False) as s:
        down = await s.client.get("/health")
        assert down.status_code == 503 and down.json()["error_type"] == "not_ready"
