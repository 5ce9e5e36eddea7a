"""GPU tests: skipped cleanly without CUDA. On the device machine they run with their own ini
(``scripts/gpu_check.sh``): ``pytest -c tests/gpu/pytest.ini tests/gpu``.

The real-weights tests need the default model and the test split; on a machine without the store or the
dataset cache (the device machine) they read ``EXITSERVE_GPU_MODEL_DIR`` (a model version directory) and
``EXITSERVE_GPU_TEST_DATA`` (JSONL of {text, label}), which ``scripts/gpu_bundle.py`` writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from model_store.store import LoadedModel, load_version_dir

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def real_model() -> LoadedModel:
    """The default model (float32), from EXITSERVE_GPU_MODEL_DIR or the local store."""
    path = os.environ.get("EXITSERVE_GPU_MODEL_DIR")
    if path is None:
        from model_store.store import ModelStore

        store = ModelStore(REPO / "store")
        versions = store.list_versions("spam-minilm")
        if not versions:
            pytest.skip("no default model: set EXITSERVE_GPU_MODEL_DIR or build it (make serve)")
        return store.load("spam-minilm")
    return load_version_dir(Path(path))


@pytest.fixture(scope="session")
def test_texts() -> list[str]:
    """The SpamAssassin test split's texts."""
    path = os.environ.get("EXITSERVE_GPU_TEST_DATA")
    if path is not None:
        return [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]
    try:
        from model_store.data import load_data

        return [e.text for e in load_data("spamassassin", REPO / ".cache").test]
    except Exception as e:  # no dataset cache and no network: the device machine
        pytest.skip(f"no test split ({e}); set EXITSERVE_GPU_TEST_DATA")
