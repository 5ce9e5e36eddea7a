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
    """Tokenize ``texts`` (cut by characters first), truncating to ``max_seq_length`` tokens."""
    cut = [cut_text(t, max_seq_length) for t in texts]
    enc = tokenizer(
        cut,
        padding="longest",
        truncation=True,
        max_length=max_seq_length,
        return_overflowing_tokens=False,
        return_length=True,
        return_tensors="pt",
    )
    num_tokens = enc["attention_mask"].sum(dim=1).tolist()
    # A row is truncated when it filled max_seq_length and there was more text than fitted.
    truncated = [
        n >= max_seq_length and (len(t) > len(c) or _tokens_exceed(tokenizer, c, max_seq_length))
        for n, t, c in zip(num_tokens, texts, cut, strict=True)
    ]
    return EncodedBatch(enc["input_ids"], enc["attention_mask"], num_tokens, truncated)


def _tokens_exceed(tokenizer: PreTrainedTokenizerBase, text: str, max_seq_length: int) -> bool:
    ids = tokenizer(text, truncation=True, max_length=max_seq_length + 1)["input_ids"]
    return len(ids) > max_seq_length


class RowTokenizer:
    """Thread-safe tokenization of single texts into unpadded token ids, as the server needs them.

    Hugging Face fast tokenizers keep truncation and padding settings as mutable state on the shared
    backend, so concurrent calls with different settings race. Every call here uses one fixed setting,
    under a lock. Overflowing chunks tell whether a text was truncated; the first chunk is exactly what
    ``encode_texts`` gives for the text, so serving and the reference forward see the same tokens.
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
