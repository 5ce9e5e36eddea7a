"""Turning texts into padded token tensors, the same way for training, calibration and serving."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

# Tokenizers read a whole text before truncating (a 231 k-character email took ~0.5 s), so texts are cut
# by characters first. No subword is shorter than one character, and the tokenizer adds at most a few
# special tokens, so this many characters per token never cuts text the model would have seen.
CHARS_PER_TOKEN_BOUND = 16


@dataclass(frozen=True)
class EncodedBatch:
    """Token ids and attention mask, padded on the right to the longest row of this batch."""

    input_ids: torch.Tensor  # (rows, seq) long
    attention_mask: torch.Tensor  # (rows, seq) long, 1 = real token
    num_tokens: list[int]  # real tokens per row, special tokens included
    truncated: list[bool]  # whether the row was cut to max_seq_length


def cut_text(text: str, max_seq_length: int) -> str:
    """Cut ``text`` by characters to a length that still covers ``max_seq_length`` tokens."""
    return text[: max_seq_length * CHARS_PER_TOKEN_BOUND]


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_seq_length: int) -> EncodedBatch:
    """Tokenize ``texts`` exactly as the server does (``RowTokenizer``), padded on the right."""
    rows = RowTokenizer(tokenizer, max_seq_length)(texts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    longest = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    return EncodedBatch(input_ids, attention_mask, [len(ids) for ids, _ in rows], [t for _, t in rows])


class RowTokenizer:
    """Thread-safe tokenization of single texts into unpadded token ids, as the server needs them.

    Hugging Face fast tokenizers keep truncation and padding settings as mutable state on the shared
    backend, so concurrent calls with different settings race. Every call here uses one fixed setting,
    under a lock. Overflowing chunks tell whether a text was truncated. ``encode_texts`` (training,
    calibration, the reference forward) is built on this class, so every path sees the same tokens.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self._lock = threading.Lock()

    def __call__(self, texts: list[str]) -> list[tuple[tuple[int, ...], bool]]:
        """Token ids (special tokens included) and whether the text was truncated, per text."""
        cut = [cut_text(t, self.max_seq_length) for t in texts]
        with self._lock:
            enc = self.tokenizer(
                cut, truncation=True, max_length=self.max_seq_length, return_overflowing_tokens=True
            )
        chunks: list[list[list[int]]] = [[] for _ in texts]
        for ids, sample in zip(enc["input_ids"], enc["overflow_to_sample_mapping"], strict=True):
            chunks[sample].append(ids)
        out = []
        for text, short, parts in zip(texts, cut, chunks, strict=True):
            first = parts[0]
            truncated = len(parts) > 1 or (len(short) < len(text) and len(first) >= self.max_seq_length)
            out.append((tuple(first), truncated))
        return out
