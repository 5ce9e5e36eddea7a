"""Tokenizer cost per text: the Rust library alone against the BERT fast path (``fast_tokens.py``).

One ``RowTokenizer`` with its fast path and one with it off (every text through the library), the same
texts, one text per call as a front end tokenizes a request (holding the GIL up to 1,024 characters,
the batch call above, as ``EngineClient`` does): the ceiling's 150-character text and 2,000-character
email, then every email of the SpamAssassin test split once in order (ASCII and not apart: a word seen for
the first time costs the fast path a library call, and a character outside ASCII a probe, so the first
pass over distinct emails shows what a cold start costs; a second pass, what it costs warm). The two take
turns, ``rounds`` times; the medians are reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def _per_text_us(call: Callable[[str], object], texts: list[str]) -> float:
    started = time.perf_counter()
    for text in texts:
        call(text)
    return (time.perf_counter() - started) / len(texts) * 1e6


def _as_front_end(rows: Any) -> Callable[[str], object]:
    from server.engine.client import HOLD_GIL_TOKENIZE_CHARS

    return lambda text: rows([text], hold_gil=len(text) <= HOLD_GIL_TOKENIZE_CHARS)


def tokenizer_cost(
    tokenizer: Any, max_seq_length: int, samples: dict[str, str], corpus: list[str], rounds: int = 3
) -> dict[str, dict[str, float]]:
    """Median microseconds per text, library vs fast path: each sample text 2,000 times (after a
    warm-up), and the corpus's ASCII and other emails once each per round, with a fresh fast path (an
    empty word cache) every round."""
    from model_store.tokens import RowTokenizer

    library = RowTokenizer(tokenizer, max_seq_length, fast_path=False)
    kinds = {name: [text] * 2000 for name, text in samples.items()}
    kinds["corpus, ASCII emails"] = [t for t in corpus if t.isascii()]
    kinds["corpus, other emails"] = [t for t in corpus if not t.isascii()]
    labels = ("library", "fast", "fast_again")
    runs: dict[str, dict[str, list[float]]] = {name: {k: [] for k in labels} for name in kinds if kinds[name]}
    for _ in range(rounds):
        fast = RowTokenizer(tokenizer, max_seq_length)  # cold: no word cached, few characters learned
        for name, texts in kinds.items():
            if not texts:
                continue
            for label, rows in (("library", library), ("fast", fast), ("fast_again", fast)):
                call = _as_front_end(rows)
                if name in samples:
                    _per_text_us(call, texts[:200])  # warm-up
                runs[name][label].append(_per_text_us(call, texts))
    return {
        name: {
            "library_us": statistics.median(r["library"]),
            "fast_us": statistics.median(r["fast"]),
            "fast_again_us": statistics.median(r["fast_again"]),
            "num_texts": float(len(kinds[name])),
        }
        for name, r in runs.items()
    }
