"""Turning texts into padded token tensors, the same way for training, calibration and serving."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from model_store.tokens import CHARS_PER_TOKEN_BOUND, RowTokenizer, cut_text

__all__ = ["CHARS_PER_TOKEN_BOUND", "EncodedBatch", "RowTokenizer", "cut_text", "encode_texts"]


@dataclass(frozen=True)
class EncodedBatch:
    """Token ids and attention mask, padded on the right to the longest row of this batch."""

    input_ids: torch.Tensor  # (rows, seq) long
    attention_mask: torch.Tensor  # (rows, seq) long, 1 = real token
    num_tokens: list[int]  # real tokens per row, special tokens included
    truncated: list[bool]  # whether the row was cut to max_seq_length


@functools.lru_cache(maxsize=8)
def row_tokenizer(tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> RowTokenizer:
    """The ``RowTokenizer`` of ``tokenizer`` at ``max_seq_length``, built once: building one probes the
    tokenizer for its fast path (``model_store/fast_tokens.py``), tens of milliseconds that a caller
    encoding a few texts at a time (training in chunks, the pipeline baseline per request) must not pay
    per call. A few are kept (tokenizers compare by identity), each safe across threads."""
    return RowTokenizer(tokenizer, max_seq_length)


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str | tuple[str, str]], max_seq_length: int
) -> EncodedBatch:
    """Tokenize ``texts`` (or pairs) exactly as the server does (``RowTokenizer``), padded on the right."""
    rows = row_tokenizer(tokenizer, max_seq_length)(texts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    longest = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    return EncodedBatch(input_ids, attention_mask, [len(ids) for ids, _ in rows], [t for _, t in rows])
