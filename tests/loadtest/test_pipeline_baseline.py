"""The batch-size-1 baseline serves the same weights as the store's model, at full depth."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from loadtest.baselines.pipeline_server import create_app
from loadtest.tiny import make_tiny_store
from model_store.store import ModelStore
from model_store.text import encode_texts

pytestmark = pytest.mark.model


async def test_replies_like_exitserve_with_the_final_ramp(tmp_path: Path) -> None:
    make_tiny_store(tmp_path / "store", max_seq_length=16)
    loaded = ModelStore(tmp_path / "store").load("tiny-1layer")
    assert loaded.manifest.num_layers == 1
    texts = ["free money now", "lunch at noon?"]
    transport = httpx.ASGITransport(app=create_app(loaded))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        assert (await client.get("/readyz")).status_code == 200
        reply = await client.post("/v1/classify", json={"inputs": texts, "speed": 0.9})
    assert reply.status_code == 200
    results = reply.json()["results"]
    batch = encode_texts(loaded.tokenizer, texts, loaded.manifest.max_seq_length)
    with torch.inference_mode():
        final = loaded.model.all_ramp_logits(batch.input_ids, batch.attention_mask)[-1].softmax(-1)
    for row, result in enumerate(results):
        assert result["exit_layer"] == result["num_layers_run"] == 1  # full depth whatever the speed
        assert result["label"] == loaded.manifest.labels[int(final[row].argmax())]
        assert result["score"] == pytest.approx(float(final[row].max()), abs=1e-5)
