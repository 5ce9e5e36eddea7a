"""KServe v2 / Open Inference Protocol routes."""

from __future__ import annotations

import importlib.metadata
import json
import struct
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
    server = (await served.client.get("/v2")).json()
    assert server["name"] == "exitserve" and server["extensions"] == ["binary_tensor_data"]
    assert server["version"] == importlib.metadata.version("exitserve")  # the server's, not the protocol's


async def test_not_ready() -> None:
    async with serve(start=False) as s:
        assert (await s.client.get("/v2/health/live")).status_code == 200
        # The protocol's health endpoints answer false with a 4xx (Triton's clients read any non-200 so).
        assert_error(await s.client.get("/v2/health/ready"), 400, "not_ready")


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
        "parameters": {"max_layers": 1},
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
            422,
            "invalid_request",
            "inputs[0].data",
        ),
        (
            infer_body(["a"], parameters={"unrelated_client_flag": 1}),
            422,
            "invalid_request",
            "parameters.unrelated_client_flag",
        ),
        (infer_body(["a"], parameters={"timeout": -5}), 422, "invalid_request", "parameters.timeout"),
        (
            infer_body(["a"], outputs=[{"name": "label", "parameters": {"classification": 2}}]),
            422,
            "invalid_request",
            "outputs[0].parameters.classification",
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


def _bytes_tensor(texts: list[str]) -> bytes:
    """Triton's serialize_byte_tensor: a 4-byte little-endian length, then the bytes, per element."""
    return b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)


def _binary_request(header: dict[str, Any], binary: bytes, **headers: str) -> dict[str, Any]:
    head = json.dumps(header).encode()
    return {
        "content": head + binary,
        "headers": {"Inference-Header-Content-Length": str(len(head)), **headers},
    }


async def test_binary_tensor_data_in_and_out(served: Served) -> None:
    texts = ["free money", "see you at lunch tomorrow ok"]
    binary = _bytes_tensor(texts)
    header = {
        "inputs": [
            {
                "name": "text",
                "shape": [2],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(binary)},
            }
        ],
        "outputs": [
            {"name": "label", "parameters": {"binary_data": True}},
            {"name": "score", "parameters": {"binary_data": True}},
            {"name": "exit_layer", "parameters": {"binary_data": False}},
        ],
    }
    # No Content-Type, as Triton's HTTP client sends it.
    response = await served.client.post(INFER, **_binary_request(header, binary))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    reply = json.loads(response.content[:length])
    rest = response.content[length:]
    label, score, exit_layer = reply["outputs"]
    assert score["parameters"]["binary_data_size"] == 8  # two FP32
    assert "data" not in label and label["parameters"]["binary_data_size"] == len(
        _bytes_tensor(["spam", "ham"])
    )
    assert rest[: label["parameters"]["binary_data_size"]] == _bytes_tensor(["spam", "ham"])
    scores = struct.unpack("<2f", rest[label["parameters"]["binary_data_size"] :])
    assert scores == pytest.approx((0.9, 0.8))
    assert exit_layer["data"] == [2, 4]
    assert [t for t in served.engine.calls[0][0]] == texts


async def test_binary_data_output_sends_every_output_in_binary(served: Served) -> None:
    body = infer_body(["free"], parameters={"binary_data_output": True})
    response = await served.client.post(INFER, content=json.dumps(body))  # JSON without a Content-Type
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    outputs = json.loads(response.content[:length])["outputs"]
    sizes = [o["parameters"]["binary_data_size"] for o in outputs]
    assert len(response.content) == length + sum(sizes)
    assert {o["name"]: o["parameters"]["binary_data_size"] for o in outputs}["truncated"] == 1  # one BOOL


async def test_binary_input_errors_name_what_is_wrong(served: Served) -> None:
    binary = _bytes_tensor(["ok"])
    header = {
        "inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 99}}]
    }
    assert_error(
        await served.client.post(INFER, **_binary_request(header, binary)),
        422,
        "invalid_request",
        "inputs[0].parameters.binary_data_size",
    )
    header["inputs"][0]["parameters"] = {"binary_data_size": 3}
    assert_error(
        await served.client.post(INFER, **_binary_request(header, b"\x09\x00\x00")), 400, "invalid_request"
    )
    bad_utf8 = struct.pack("<I", 2) + b"\xff\xfe"
    header["inputs"][0]["parameters"] = {"binary_data_size": len(bad_utf8)}
    assert_error(await served.client.post(INFER, **_binary_request(header, bad_utf8)), 400, "invalid_utf8")
    too_long = {"content": b"{}", "headers": {"Inference-Header-Content-Length": "50"}}
    assert_error(await served.client.post(INFER, **too_long), 400, "invalid_request")
    text_plain = {"content": b"{}", "headers": {"content-type": "text/plain"}}
    assert_error(await served.client.post(INFER, **text_plain), 415, "unsupported_media_type")
    assert served.engine.calls == []


async def test_triton_timeout_parameter_is_the_deadline(served: Served) -> None:
    response = await served.client.post(INFER, json=infer_body(["a"], parameters={"timeout": 250_000}))
    assert response.status_code == 200, response.text
    options = served.engine.calls[0][1]
    assert options.deadline_s is not None
