"""Texts to token ids for serving, through the Rust ``tokenizers`` library. No torch, no transformers:
an HTTP front end tokenizes with this alone."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer

from model_store.errors import CorruptFileError
from model_store.fast_tokens import FastWordPiece

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOKENIZER_FILE = "tokenizer.json"

# Tokenizers read a whole text before truncating (a 231 k-character email took ~0.5 s), so texts are cut
# by characters first. No subword is shorter than one character, and the tokenizer adds at most a few
# special tokens, so this many characters per token never cuts text the model would have seen.
CHARS_PER_TOKEN_BOUND = 16


# The Rust tokenizer's batch encode, or RowTokenizer._encode_holding: (texts or pairs, add_special_tokens).
Encode = Callable[..., list[Any]]


def cut_text(text: str, max_seq_length: int) -> str:
    """Cut ``text`` by characters to a length that still covers ``max_seq_length`` tokens."""
    return text[: max_seq_length * CHARS_PER_TOKEN_BOUND]


def load_tokenizer_file(version_dir: Path) -> Tokenizer:
    """The Rust tokenizer of a model version (``tokenizer.json``, as Hugging Face saves it)."""
    path = Path(version_dir) / TOKENIZER_FILE
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises plain Exceptions for unreadable files
        raise CorruptFileError(path, f"cannot load the tokenizer: {e}") from None


class RowTokenizer:
    """Tokenization of texts into unpadded token ids, straight through the Rust ``tokenizers`` library.

    The Hugging Face wrapper sets truncation and padding as mutable state on the shared backend at every
    call, so concurrent calls had to be serialised under a lock, and each call paid ~40 us of Python
    argument handling. Here a private copy of the backend is configured once (truncation to
    ``max_seq_length``, no padding) and never changed again, so calls need no lock and run concurrently
    (the batch call releases the GIL; ``hold_gil`` says when not to). The ids are the wrapper's own:
    ``tests/model_store/test_text.py`` compares them. ``encode_texts`` (training, calibration, the
    reference forward) is built on this class, so every path sees the same tokens.

    Single texts of a BERT-family tokenizer take a fast path with the library's own ids
    (``fast_tokens.FastWordPiece``; its cost against the library's: ``make ceiling``, BENCHMARKS.md); it
    holds the GIL, and is short enough to (tens of microseconds for an email).
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase | Tokenizer, max_seq_length: int, *, fast_path: bool = True
    ) -> None:
        """``tokenizer``: a Hugging Face fast tokenizer (its Rust backend is copied), or the Rust
        tokenizer itself (``load_tokenizer_file``: what a front end loads, without transformers).
        ``fast_path=False``: every text through the library (the reference the fast path is compared
        with, in tests and ``loadtest/tokenizer_cost.py``)."""
        self.max_seq_length = max_seq_length
        backend = (
            tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
        )
        if not isinstance(backend, Tokenizer):
            raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer (no Rust backend)")
        self._backend = Tokenizer.from_str(backend.to_str())
        self._backend.no_padding()
        self._backend.enable_truncation(max_seq_length, stride=0, strategy="longest_first", direction="right")
        # encode_batch_fast skips character offsets, which serving never reads.
        self._encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        # Texts of BERT-family tokenizers skip the library's per-call bookkeeping, same ids
        # (``fast_tokens``); None for any other tokenizer.
        self._fast = (
            FastWordPiece.for_tokenizer(
                self._backend,
                max_seq_length,
                prefix_chars=max_seq_length * PREFIX_CHARS_PER_TOKEN,
                cut_chars=max_seq_length * CHARS_PER_TOKEN_BOUND,
                reference=lambda text: self._library_singles([text], self._encode_holding)[0],
            )
            if fast_path
            else None
        )

    def __call__(
        self, texts: Sequence[str | tuple[str, str]], *, hold_gil: bool = False
    ) -> list[tuple[tuple[int, ...], bool]]:
        """Token ids (special tokens included) and whether the text was truncated, per text. Pairs
        (``(text, text_pair)`` tuples; all inputs of a call are pairs or none are) are joined as the
        tokenizer joins pairs and truncated longest-first, each segment cut by characters first.

        A long text is first tokenized by a prefix of ``PREFIX_CHARS_PER_TOKEN`` characters per token,
        cut at a space: tokens never span a space, so if that prefix alone overflows the model's length,
        its ids are the whole text's (measured: a 2,000-character email took 1 ms, most of it for tokens
        truncation then threw away). Otherwise the text is tokenized again, cut by ``cut_text``.

        ``hold_gil``: encode one text at a time without releasing the GIL. The batch call releases it,
        which lets other threads run during a long batch, but a short call then waits to get it back
        behind any busy thread (up to the 5 ms switch interval: for a 150-character text next to a
        spinning thread, measured 5.1 ms for the batch call, 84 us holding the GIL, 45 us alone). Same
        ids either way (tested).
        """
        encode = self._encode_holding if hold_gil else self._encode
        if texts and isinstance(texts[0], tuple):
            return self._pairs(texts, encode)  # type: ignore[arg-type]
        singles: list[str] = texts  # type: ignore[assignment]
        return self._singles(singles, encode)

    def _encode_holding(self, items: Sequence[str | tuple[str, str]], add_special_tokens: bool) -> list[Any]:
        encode = self._backend.encode
        return [
            encode(x, add_special_tokens=add_special_tokens)
            if isinstance(x, str)
            else encode(x[0], x[1], add_special_tokens=add_special_tokens)
            for x in items
        ]

    def _pairs(self, pairs: Sequence[tuple[str, str]], encode: Encode) -> list[tuple[tuple[int, ...], bool]]:
        if not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
            raise TypeError("inputs must be all texts or all (text, text_pair) pairs")
        cut = [(cut_text(a, self.max_seq_length), cut_text(b, self.max_seq_length)) for a, b in pairs]
        out = []
        for (a, b), (ca, cb), encoding in zip(pairs, cut, encode(cut, add_special_tokens=True), strict=True):
            ids = encoding.ids
            was_cut = len(ca) < len(a) or len(cb) < len(b)
            out.append(
                (tuple(ids), bool(encoding.overflowing) or (was_cut and len(ids) >= self.max_seq_length))
            )
        return out

    def _singles(self, texts: list[str], encode: Encode) -> list[tuple[tuple[int, ...], bool]]:
        fast = self._fast
        if fast is None:
            return self._library_singles(texts, encode)
        out = [fast(text) for text in texts]
        others = [i for i, row in enumerate(out) if row is None]
        if others:
            rows = self._library_singles([texts[i] for i in others], encode)
            for i, row in zip(others, rows, strict=True):
                out[i] = row
        return out  # type: ignore[return-value]  # every None was replaced

    def _library_singles(self, texts: list[str], encode: Encode) -> list[tuple[tuple[int, ...], bool]]:
        prefixes = [_prefix(t, self.max_seq_length * PREFIX_CHARS_PER_TOKEN) for t in texts]
        out: list[tuple[tuple[int, ...], bool]] = []
        again: list[int] = []
        for i, (text, prefix, encoding) in enumerate(
            zip(texts, prefixes, encode(prefixes, add_special_tokens=True), strict=True)
        ):
            if encoding.overflowing:
                out.append((tuple(encoding.ids), True))
            elif prefix is text:
                out.append((tuple(encoding.ids), False))
            else:
                out.append(((), False))
                again.append(i)
        if again:
            for i, row in zip(again, self._whole([texts[i] for i in again], encode), strict=True):
                out[i] = row
        return out

    def _whole(self, texts: list[str], encode: Encode) -> list[tuple[tuple[int, ...], bool]]:
        cut = [cut_text(t, self.max_seq_length) for t in texts]
        out = []
        for text, short, encoding in zip(texts, cut, encode(cut, add_special_tokens=True), strict=True):
            ids = encoding.ids
            truncated = bool(encoding.overflowing) or (
                len(short) < len(text) and len(ids) >= self.max_seq_length
            )
            out.append((tuple(ids), truncated))
        return out


# Characters per token of the first, prefix-only attempt: English and email text average 3-5.
PREFIX_CHARS_PER_TOKEN = 6


def _prefix(text: str, num_chars: int) -> str:
    """``text`` itself when short; else its first ``num_chars`` characters, ended before a space in their
    last quarter (so no word is cut), or ``""`` (no such space: the whole text is tokenized at once)."""
    if len(text) <= num_chars:
        return text
    end = max(text.rfind(" ", num_chars * 3 // 4, num_chars), text.rfind("\n", num_chars * 3 // 4, num_chars))
    return text[:end] if end > 0 else ""
