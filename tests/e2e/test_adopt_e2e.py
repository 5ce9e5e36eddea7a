"""An adopted checkpoint served over real HTTP: full depth answers with the checkpoint's own probabilities."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from model_store.cli import main
from tests.checkpoints import LABELS, checkpoint_probs, colour_texts, make_checkpoint, write_texts
from tests.e2e.conftest import start_server


@pytest.fixture(scope="module")
def adopted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adopt")
    checkpoint = make_checkpoint("distilbert", root / "my-distilbert")
    texts = write_texts(root / "unlabelled.txt")
    store = root / "store"
    argv = ["adopt", str(checkpoint), "--texts", str(texts), "--out", str(store), "--name", "colours"]
    assert main([*argv, "--no-progress", "--threads", "1", "--ramp-epochs", "30"]) == 0
    return checkpoint, store


def test_adopted_distilbert_served_over_http(
    adopted: tuple[Path, Path], tmp_path: Path, frontends: int
) -> None:
    checkpoint, store = adopted
    texts = [t for t, _ in colour_texts(12, seed=11)]
    want = checkpoint_probs(checkpoint, texts, 16)
    running = start_server(store, tmp_path / "server.log", model="colours", frontends=frontends)
    try:
        full = httpx.post(
            f"{running.base_url}/v1/classify",
            json={"inputs": texts, "speed": 0.0, "return_probs": True},
            timeout=30,
        )
        assert full.status_code == 200, full.text
        for i, result in enumerate(full.json()["results"]):
            probs = [result["probs"][label] for label in LABELS]
            assert max(abs(a - float(b)) for a, b in zip(probs, want[i], strict=True)) <= 1e-5
            assert result["label"] == LABELS[int(want[i].argmax())]
            assert result["exit_layer"] == 3
        fast = httpx.post(f"{running.base_url}/v1/classify", json={"inputs": texts, "speed": 1.0}, timeout=30)
        assert fast.status_code == 200, fast.text
        assert {r["exit_layer"] for r in fast.json()["results"]} == {1}
        models = httpx.get(f"{running.base_url}/v1/models", timeout=10).json()
        assert "colours" in str(models) and "adopt" in str(models)
    finally:
        running.terminate()
