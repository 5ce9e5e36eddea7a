"""Baseline: the server a user writes first. Plain FastAPI, one request at a time, batch size 1.

It serves the same weights as exitserve (loaded from the model store with ``ModelStore.load``) and runs
what a ``transformers`` text-classification pipeline runs for one text: tokenize it, run the whole
encoder, then the final classifier (here the ramp after the last layer), softmax. No dynamic batching,
no early exit. The endpoint is a plain ``def``, so FastAPI runs it in its thread pool, as such servers do.

It answers ``POST /v1/classify`` with the same reply shape as exitserve (``exit_layer`` is always the
last layer), so the load generator treats both alike. ``GET /readyz`` is 200 once the model is loaded.

    python -m loadtest.baselines.pipeline_server --store store --model spam-minilm --port 8100
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from model_store.store import LoadedModel, ModelStore
from model_store.text import encode_texts


class ClassifyBody(BaseModel):
    inputs: str | list[str]
    speed: float | None = None  # accepted and ignored: this server always runs at full depth
    criterion: str | None = None


def predict_one(loaded: LoadedModel, text: str) -> dict[str, Any]:
    """Full depth for one text: encoder layers 1..L, then the final classifier."""
    model, num_layers = loaded.model, loaded.model.num_layers
    batch = encode_texts(loaded.tokenizer, [text], loaded.manifest.max_seq_length)
    with torch.inference_mode():
        hidden = model.embed(batch.input_ids, batch.attention_mask)
        for layer in range(1, num_layers + 1):
            hidden = model.run_layer(layer, hidden, batch.attention_mask)
        probs = torch.softmax(model.ramp_logits(num_layers, hidden, batch.attention_mask), dim=-1)[0]
    index = int(probs.argmax())
    return {
        "label": loaded.manifest.labels[index],
        "score": float(probs[index]),
        "exit_layer": num_layers,
        "num_layers_run": num_layers,
        "truncated": batch.truncated[0],
    }


def create_app(loaded: LoadedModel) -> FastAPI:
    app = FastAPI(title="pipeline baseline (batch size 1, full depth)")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/classify")
    def classify(body: ClassifyBody) -> dict[str, Any]:
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        return {
            "model": loaded.manifest.name,
            "version": loaded.manifest.version,
            "speed": 0.0,
            "criterion": "none",
            "results": [predict_one(loaded, text) for text in texts],
        }

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", default="store", help="model store directory (default: store)")
    parser.add_argument("--model", default="spam-minilm", help="model name (default: spam-minilm)")
    parser.add_argument("--version", default=None, help="model version (default: latest)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    loaded = ModelStore(args.store).load(args.model, args.version)
    uvicorn.run(create_app(loaded), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
