"""Markers come from the folder a test lives in, so `-m unit` etc. select by layer of the system."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS_DIR = Path(__file__).parent
FOLDER_MARKERS = {
    "model_store": "model",
    "engine": "unit",
    "api": "api",
    "e2e": "e2e",
    "deploy": "deploy",
    "gpu": "gpu",
    "loadtest": "unit",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    folder_markers = set(FOLDER_MARKERS.values())
    for item in items:
        if any(m.name in folder_markers for m in item.iter_markers()):
            continue  # a module that sets its own marker (e.g. a model test among unit tests) keeps it
        parts = Path(str(item.fspath)).relative_to(TESTS_DIR).parts
        for part in reversed(parts[:-1]):
            if part in FOLDER_MARKERS:
                item.add_marker(getattr(pytest.mark, FOLDER_MARKERS[part]))
                break
