"""Hugging Face's own client, ``huggingface_hub.InferenceClient``, and TEI's routes against a live server."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from huggingface_hub import InferenceClient, constants
from huggingface_hub.errors import HfHubHTTPError

from tests.e2e.conftest import ServerProcess

TEXTS = ["free money now click", "are we still on for lunch"]


@pytest.fixture(autouse=True)
def loopback_allowed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The tests run with HF_HUB_OFFLINE=1 so that nothing reaches the Hub; the client's offline guard
    would refuse the loopback server too. Only the server under test is ever called here."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield


def _v1(server: ServerProcess, text: str) -> dict[str, object]:
    reply = httpx.post(
        f"{server.base_url}/v1/classify", json={"inputs": text, "return_probs": True, "speed": 0.5}
    )
    assert reply.status_code == 200, reply.text
    return dict(reply.json()["results"][0])


def test_inference_client_text_classification(server: ServerProcess) -> None:
    client = InferenceClient(base_url=server.base_url)
    for text in TEXTS:
        output = client.text_classification(text)  # the model's default speed
        expected = _v1(server, text)
        probs = expected["probs"]
        assert isinstance(probs, dict)
        assert [o.label for o in output] == sorted(probs, key=lambda label: -probs[label])
        assert output[0].label == expected["label"]
        for element in output:
            assert element.score == pytest.approx(probs[element.label], abs=1e-6)
    top = client.text_classification(TEXTS[0], top_k=1)
    assert len(top) == 1 and top[0].label == _v1(server, TEXTS[0])["label"]


def test_inference_client_errors_surface_the_servers_message(server: ServerProcess) -> None:
    client = InferenceClient(base_url=server.base_url)
    with pytest.raises(HfHubHTTPError) as refused:
        client.text_classification(TEXTS[0], function_to_apply="sigmoid")
    assert refused.value.response.status_code == 422
    assert "function_to_apply" in str(refused.value)


def test_tei_predict_info_health(server: ServerProcess) -> None:
    one = httpx.post(f"{server.base_url}/predict", json={"inputs": TEXTS[0], "truncate": True, "speed": 0.5})
    assert one.status_code == 200, one.text
    expected = _v1(server, TEXTS[0])
    assert one.json()[0] == {"label": expected["label"], "score": pytest.approx(expected["score"], abs=1e-6)}
    batch = httpx.post(f"{server.base_url}/predict", json={"inputs": TEXTS, "truncate": True})
    assert [len(entries) for entries in batch.json()] == [3, 3]  # every label of the tiny model
    # TEI's default is truncate: false: an input longer than the model takes is a 413, not cut.
    long_text = " ".join(["invoice"] * 200)
    refused = httpx.post(f"{server.base_url}/predict", json={"inputs": long_text})
    assert refused.status_code == 413, refused.text
    assert refused.json()["error_type"] == "payload_too_large"
    info = httpx.get(f"{server.base_url}/info").json()
    assert info["model_id"] == "tiny" and set(info["model_type"]["classifier"]["label2id"]) == {"a", "b", "c"}
    health = httpx.get(f"{server.base_url}/health")
    assert health.status_code == 200 and health.content == b""
