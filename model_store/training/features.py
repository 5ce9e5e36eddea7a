"""Tokenize once, batch many times; per-layer pooled features of a frozen backbone for ramp training."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from model_store.data import Example
from model_store.early_exit import EarlyExitClassifier, OffRamp, masked_mean
from model_store.text import encode_texts

ENCODE_CHUNK = 256


@dataclass(frozen=True)
class TokenizedSet:
    """Examples tokenized once: one unpadded id tensor per row, label indices and groups."""

    input_ids: list[torch.Tensor]
    labels: torch.Tensor  # (rows,) long
    groups: list[str]
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, rows: list[int]) -> TokenizedSet:
        return TokenizedSet(
            [self.input_ids[i] for i in rows],
            self.labels[rows],
            [self.groups[i] for i in rows],
            self.pad_token_id,
        )

    def batch(self, rows: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and attention mask of ``rows``."""
        seqs = [self.input_ids[int(i)] for i in rows]
        longest = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return ids, mask


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase, examples: list[Example], labels: list[str], max_seq_length: int
) -> TokenizedSet:
    """Tokenize with ``text.encode_texts`` (the serving path), keeping each row unpadded."""
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({ex.label for ex in examples} - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the model's labels {labels}")
    rows: list[torch.Tensor] = []
    for start in range(0, len(examples), ENCODE_CHUNK):
        chunk = examples[start : start + ENCODE_CHUNK]
        enc = encode_texts(tokenizer, [ex.inputs for ex in chunk], max_seq_length)
        rows += [enc.input_ids[i, :n].clone() for i, n in enumerate(enc.num_tokens)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TokenizedSet(
        input_ids=rows,
        labels=torch.tensor([index[ex.label] for ex in examples], dtype=torch.long),
        groups=[ex.group for ex in examples],
        pad_token_id=int(pad),
    )


LENGTH_PERCENTILE = 0.95
MIN_SEQ_LENGTH = 16
POSITION_OFFSET_TYPES = frozenset(
    {"roberta", "xlm-roberta", "camembert", "mpnet"}
)  # positions start at pad+1


def encoder_length_limit(config: Any, tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest input the encoder takes (position table, less RoBERTa-style offsets; the tokenizer's
    own limit when it states a real one)."""
    limit = int(getattr(config, "max_position_embeddings", 512))
    if config.model_type in POSITION_OFFSET_TYPES:
        limit -= int(getattr(config, "pad_token_id", 1) or 1) + 1
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 100_000:
        limit = min(limit, model_max)
    return limit


def choose_max_seq_length(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str | tuple[str, str]], limit: int
) -> int:
    """The 95th percentile of the token lengths (special tokens included), rounded up to 8, in
    [16, limit]."""
    sample = texts[:: max(1, len(texts) // 2000)]
    lengths = sorted(len(ids) for ids in tokenizer(sample, truncation=False, verbose=False)["input_ids"])
    p95 = lengths[min(len(lengths) - 1, math.ceil(LENGTH_PERCENTILE * len(lengths)) - 1)]
    return max(min(MIN_SEQ_LENGTH, limit), min(limit, 8 * math.ceil(p95 / 8)))


def length_sorted_batches(data: TokenizedSet, batch_size: int) -> Iterator[list[int]]:
    """Row indices in batches of similar length (less padding for inference)."""
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.inference_mode()
def collect_ramp_logits(
    model: EarlyExitClassifier, data: TokenizedSet, batch_size: int = 32, progress: tqdm | None = None
) -> torch.Tensor:
    """Every ramp's logits for every row, computed once: ``(rows, num_layers, num_labels)``."""
    model.eval()
    out = torch.empty(len(data), model.num_layers, model.num_labels)
    for rows in length_sorted_batches(data, batch_size):
        ids, mask = data.batch(rows)
        out[rows] = torch.stack(model.all_ramp_logits(ids, mask), dim=1).float()
        if progress is not None:
            progress.update(len(rows))
    return out


def collect_pooled_features(
    model: EarlyExitClassifier, data: TokenizedSet, batch_size: int = 32, progress: tqdm | None = None
) -> torch.Tensor:
    """Masked-mean hidden state after every layer: ``(rows, num_layers, hidden)``.

    Ramps pool first, so on a frozen backbone a ramp's output depends only on these vectors: ramp
    training then needs no encoder pass per step (see ``ramp_head``).
    """
    return collect_pooled_and_final_logits(model, data, batch_size, progress)[0]


@torch.inference_mode()
def collect_pooled_and_final_logits(
    model: EarlyExitClassifier, data: TokenizedSet, batch_size: int = 32, progress: tqdm | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``collect_pooled_features`` and, from the same pass, the final exit's logits ``(rows, labels)``
    (the targets of self-distillation when the final exit is a checkpoint's own head)."""
    model.eval()
    out = torch.empty(len(data), model.num_layers, model.encoder.config.hidden_size)
    final = torch.empty(len(data), model.num_labels)
    for rows in length_sorted_batches(data, batch_size):
        ids, mask = data.batch(rows)
        hidden = model.embed(ids, mask)
        pooled = []
        for layer in range(1, model.num_layers + 1):
            hidden = model.run_layer(layer, hidden, mask)
            pooled.append(masked_mean(hidden, mask))
        out[rows] = torch.stack(pooled, dim=1).float()
        final[rows] = model.ramp_logits(model.num_layers, hidden, mask).float()
        if progress is not None:
            progress.update(len(rows))
    return out, final


def ramp_head(ramp: OffRamp | nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """``OffRamp.forward`` after its pooling step: equal to ``ramp(hidden, mask)`` (a test checks it)."""
    dense: nn.Module = ramp.dense  # type: ignore[assignment]
    out: nn.Module = ramp.out  # type: ignore[assignment]
    logits: torch.Tensor = out(torch.tanh(dense(pooled)))
    return logits
