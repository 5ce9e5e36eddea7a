"""The official Triton HTTP client (``tritonclient[http]``) against a live server: health, metadata,
inference with JSON and with binary tensors (its default), and its error path."""

from __future__ import annotations

import importlib.metadata

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import ServerProcess

TEXTS = ["free money now click", "are we still on for lunch", "winner winner agenda"]


@pytest.fixture()
def client(server: ServerProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=server.base_url.removeprefix("http://"))


def _v1(server: ServerProcess, speed: float) -> list[dict[str, object]]:
    reply = httpx.post(f"{server.base_url}/v1/classify", json={"inputs": TEXTS, "speed": speed})
    assert reply.status_code == 200, reply.text
    return list(reply.json()["results"])


def _input(binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(TEXTS)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=np.object_), binary_data=binary)
    return tensor


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "exitserve"
    assert metadata["version"] == importlib.metadata.version("exitserve")
    assert "binary_tensor_data" in metadata["extensions"]
    assert client.is_model_ready("tiny")
    model = client.get_model_metadata("tiny")
    assert model["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_gives_the_v1_answers(
    client: triton.InferenceServerClient, server: ServerProcess, binary: bool
) -> None:
    outputs = [
        triton.InferRequestedOutput(name, binary_data=binary) for name in ("label", "score", "exit_layer")
    ]
    result = client.infer("tiny", [_input(binary)], outputs=outputs, parameters={"speed": 1.0})
    expected = _v1(server, 1.0)
    labels = [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("label")]
    assert labels == [row["label"] for row in expected]
    assert result.as_numpy("exit_layer").tolist() == [row["exit_layer"] for row in expected]
    np.testing.assert_allclose(result.as_numpy("score"), [row["score"] for row in expected], rtol=1e-6)
    assert result.get_response()["parameters"]["speed"] == 1.0


def test_infer_with_the_clients_defaults_returns_every_output_in_binary(
    client: triton.InferenceServerClient, server: ServerProcess
) -> None:
    result = client.infer("tiny", [_input(True)], parameters={"speed": 0.0})  # no outputs named
    expected = _v1(server, 0.0)
    assert [label.decode() for label in result.as_numpy("label")] == [row["label"] for row in expected]
    assert result.as_numpy("num_layers_run").tolist() == [row["num_layers_run"] for row in expected]
    assert result.as_numpy("truncated").tolist() == [False] * len(TEXTS)


def test_errors_reach_the_client_as_its_exception(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as unknown_model:
        client.infer("no-such-model", [_input(True)])
    assert unknown_model.value.status() == "404"
    assert "no model 'no-such-model'" in unknown_model.value.message()
    with pytest.raises(InferenceServerException) as bad_parameter:
        client.infer("tiny", [_input(True)], parameters={"sped": 0.5})
    assert bad_parameter.value.status() == "422"
    assert "unknown request parameter 'sped'" in bad_parameter.value.message()
    with pytest.raises(InferenceServerException) as bad_speed:
        client.infer("tiny", [_input(False)], parameters={"speed": 3.0})
    assert bad_speed.value.status() == "422" and "speed" in bad_speed.value.message()
