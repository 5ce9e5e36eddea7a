"""Turning texts into padded token tensors, the same way for training, calibration and serving."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
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
    """Tokenization of texts into unpadded token ids, straight through the Rust ``tokenizers`` library.

    The Hugging Face wrapper sets truncation and padding as mutable state on the shared backend at every
    call, so concurrent calls had to be serialised under a lock, and each call paid ~40 us of Python
    argument handling. Here a private copy of the backend is configured once (truncation to
    ``max_seq_length``, no padding) and never changed again, so calls need no lock and run concurrently
    (the library releases the GIL). The ids are the wrapper's own: ``tests/model_store/test_text.py``
    compares them. ``encode_texts`` (training, calibration, the reference forward) is built on this class,
    so every path sees the same tokens.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer (no Rust backend)")
        self._backend = Tokenizer.from_str(backend.to_str())
        self._backend.no_padding()
        self._backend.enable_truncation(max_seq_length, stride=0, strategy="longest_first", direction="right")
        # encode_batch_fast skips character offsets, which serving never reads.
        self._encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)

    def __call__(self, texts: list[str]) -> list[tuple[tuple[int, ...], bool]]:
        """Token ids (special tokens included) and whether the text was truncated, per text."""
        cut = [cut_text(t, self.max_seq_length) for t in texts]
        out = []
        for text, short, encoding in zip(texts, cut, self._encode(cut, add_special_tokens=True), strict=True):
            ids = encoding.ids
            truncated = bool(encoding.overflowing) or (
                len(short) < len(text) and len(ids) >= self.max_seq_length
            )
            out.append((tuple(ids), truncated))
        return out
