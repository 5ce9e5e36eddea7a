"""KServe v2 / Open Inference Protocol routes."""

from __future__ import annotations

from typing import Any

import pytest

from tests.server.api.conftest import Served, assert_error, serve

INFER = "/v2/models/fake/infer"


def infer_body(texts: list[str], **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}], **extra}


async def test_health_and_metadata(served: Served) -> None:
    assert (await served.client.get("/v2/health/live")).json() == {"live": True}
    assert (await served.client.get("/v2/health/ready")).json() == {"ready": True}
    assert (await served.client.get("/v2/models/fake/ready")).json() == {"name": "fake", "ready": True}
    assert (await served.client.get("/v2/models/fake/versions/7/ready")).status_code == 200
    meta = (await served.client.get("/v2/models/fake")).json()
    assert meta["name"] == "fake" and meta["versions"] == ["7"]
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    outputs = {o["name"]: o["datatype"] for o in meta["outputs"]}
    assert outputs["label"] == "BYTES" and outputs["score"] == "FP32" and outputs["exit_layer"] == "INT32"
    assert (await served.client.get("/v2")).json()["name"] == "exitserve"


async def test_not_ready() -> None:
    async with serve(start=False) as s:
        assert (await s.client.get("/v2/health/live")).status_code == 200
        assert_error(await s.client.get("/v2/health/ready"), 503, "not_ready")


async def test_infer_round_trip(served: Served) -> None:
    body = infer_body(
        ["free money", "see you at lunch tomorrow ok"],
        id="req-1",
        parameters={"speed": 0.6, "criterion": "entropy"},
    )
    response = await served.client.post(INFER, json=body)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["model_name"] == "fake" and reply["model_version"] == "7" and reply["id"] == "req-1"
    assert reply["parameters"] == {"speed": 0.6, "criterion": "entropy"}
    outputs = {o["name"]: o for o in reply["outputs"]}
    assert list(outputs) == ["label", "score", "exit_layer", "num_layers_run", "truncated"]
    assert outputs["label"] == {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["spam", "ham"]}
    assert outputs["score"]["datatype"] == "FP32" and outputs["score"]["data"] == [0.9, 0.8]
    assert outputs["exit_layer"] == {"name": "exit_layer", "datatype": "INT32", "shape": [2], "data": [2, 4]}
    assert response.headers["x-queue-time-ms"] == "1.500"
    options = served.engine.calls[0][1]
    assert (options.speed, str(options.criterion)) == (0.6, "entropy")


async def test_infer_requested_outputs_and_nested_data(served: Served) -> None:
    body = {
        "inputs": [
            {"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [["free"], ["hello there"]]}
        ],
        "outputs": [{"name": "probs"}, {"name": "label"}],
        "parameters": {"max_layers": 1, "unrelated_client_flag": True},
    }
    response = await served.client.post("/v2/models/fake/versions/7/infer", json=body)
    assert response.status_code == 200, response.text
    probs, label = response.json()["outputs"]
    assert probs == {"name": "probs", "datatype": "FP32", "shape": [2, 2], "data": [0.1, 0.9, 0.8, 0.2]}
    assert label["data"] == ["spam", "ham"]
    assert served.engine.calls[0][1].max_layers == 1


@pytest.mark.parametrize(
    ("body", "status", "error_type", "field"),
    [
        (infer_body([""]), 422, "invalid_request", "inputs[0].data"),
        (
            {"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
            422,
            "invalid_request",
            "inputs[0].datatype",
        ),
        (
            {"inputs": [{"name": "t", "shape": [3], "datatype": "BYTES", "data": ["a", "b"]}]},
            422,
            "invalid_request",
            "inputs[0].shape",
        ),
        ({"inputs": []}, 422, "invalid_request", "inputs"),
        (infer_body(["a"], parameters={"speed": 2}), 422, "invalid_request", "parameters.speed"),
        (infer_body(["a"], parameters={"criterion": "nope"}), 422, "invalid_request", "parameters.criterion"),
        (infer_body(["a"], outputs=[{"name": "logits"}]), 422, "invalid_request", "outputs[0].name"),
        (
            {
                "inputs": [
                    {
                        "name": "t",
                        "shape": [1],
                        "datatype": "BYTES",
                        "data": [],
                        "parameters": {"binary_data_size": 9},
                    }
                ]
            },
            415,
            "unsupported_media_type",
            None,
        ),
    ],
)
async def test_infer_errors(
    served: Served, body: dict[str, Any], status: int, error_type: str, field: str | None
) -> None:
    assert_error(await served.client.post(INFER, json=body), status, error_type, field)
    assert served.engine.calls == []


async def test_unknown_model_or_version_404(served: Served) -> None:
    assert_error(
        await served.client.post("/v2/models/other/infer", json=infer_body(["a"])), 404, "model_not_found"
    )
    assert_error(await served.client.get("/v2/models/fake/versions/8"), 404, "model_not_found")
    assert_error(await served.client.get("/v2/models/other/ready"), 404, "model_not_found")
