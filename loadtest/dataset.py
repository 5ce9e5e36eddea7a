"""Inputs of a run: labelled texts from a dataset split, so accuracy is measured through the server.

By default the SpamAssassin test split from ``model_store.data`` (the training engineer's loader); a
JSONL file of ``{"text": ..., "label": ...}`` lines works anywhere (``label`` may be missing or null).
"""

from __future__ import annotations

import importlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Example:
    """One input text and its true label (None when unknown: not scored)."""

    text: str
    label: str | None


class DatasetError(ValueError):
    """The inputs could not be read."""


def load_jsonl(path: Path | str) -> list[Example]:
    """Read ``{"text", "label"}`` lines; blank lines are skipped, a bad line names its number."""
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DatasetError(
                    f"{path}:{line_number}: expected a JSON object with 'text' ({e})"
                ) from None
            if not isinstance(text, str):
                raise DatasetError(f"{path}:{line_number}: 'text' must be a string")
            label = row.get("label")
            examples.append(Example(text=text, label=None if label is None else str(label)))
    if not examples:
        raise DatasetError(f"{path}: no examples")
    return examples


DEFAULT_CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache"


def load_split(split: str = "test", cache_dir: Path | str = DEFAULT_CACHE_DIR) -> list[Example]:
    """A split of the SpamAssassin corpus through ``model_store.data`` (the training splits, same seed)."""
    try:
        data: Any = importlib.import_module("model_store.data")
    except ImportError as e:
        raise DatasetError(f"model_store.data is not available ({e}); pass --dataset FILE.jsonl") from None
    try:
        splits = data.load_spam_assassin(Path(cache_dir))
        rows = splits.split(split)
    except (data.DataError, ValueError) as e:
        raise DatasetError(f"cannot load the SpamAssassin {split} split: {e}") from None
    return [Example(text=str(row.text), label=str(row.label)) for row in rows]


def sample(examples: Sequence[Example], limit: int | None, seed: int) -> list[Example]:
    """A seeded shuffle of ``examples``, cut to ``limit``: every target of a benchmark gets the same."""
    chosen = list(examples)
    random.Random(seed).shuffle(chosen)
    return chosen if limit is None else chosen[:limit]
