"""``python -m model_store adopt``: a checkpoint fine-tuned in the test becomes an early-exit version whose
full depth is the checkpoint's own forward, with ramps trained from unlabelled text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model_store.cli import main
from model_store.criteria import Criterion
from model_store.data import DataError, read_texts
from model_store.reference import RowPolicies, early_exit_forward
from model_store.store import ModelStore
from model_store.text import encode_texts
from tests.checkpoints import LABELS, checkpoint_probs, colour_texts, make_checkpoint, write_texts

pytestmark = pytest.mark.model


def _adopt(tmp_path: Path, kind: str, texts: Path) -> tuple[Path, Path]:
    checkpoint = make_checkpoint(kind, tmp_path / f"ckpt-{kind}")
    store = tmp_path / "store"
    argv = ["adopt", str(checkpoint), "--texts", str(texts), "--out", str(store), "--name", f"adopted-{kind}"]
    assert main([*argv, "--no-progress", "--threads", "1", "--ramp-epochs", "30"]) == 0
    return checkpoint, store


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "albert", "deberta-v2"])
def test_full_depth_is_the_checkpoints_own_forward(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = write_texts(tmp_path / "texts.txt")  # no labels at all
    checkpoint, store = _adopt(tmp_path, kind, texts)
    out = capsys.readouterr().out
    assert "ramps trained without labels" in out and "agreement with the checkpoint" in out

    loaded = ModelStore(store).load(f"adopted-{kind}")
    m = loaded.manifest
    assert m.labels == LABELS and m.architecture == kind and m.ramp.final == "checkpoint_head"
    assert m.max_seq_length == 16  # 95th percentile of these texts' lengths, rounded up to 8
    assert m.calibration is not None and "agreement" in m.calibration.split
    assert m.provenance.recipe == "adopt" and m.provenance.labels_given is False  # type: ignore[attr-defined]

    probe = [t for t, _ in colour_texts(40, seed=9)]
    want = checkpoint_probs(checkpoint, probe, m.max_seq_length)
    enc = encode_texts(loaded.tokenizer, probe, m.max_seq_length)
    never = RowPolicies.from_rows([Criterion.NORMALIZED_ENTROPY] * len(probe), [0.0] * len(probe),
                                  [None] * len(probe), len(LABELS), m.num_layers)  # fmt: skip
    with torch.inference_mode():
        rows = early_exit_forward(loaded.model, enc.input_ids, enc.attention_mask, never)
    got = torch.tensor([r.probs for r in rows])
    assert (got - want).abs().max().item() <= 1e-5

    # The ramps learned the checkpoint's answers from unlabelled text: the first ramp mostly agrees.
    with torch.inference_mode():
        first = loaded.model.all_ramp_logits(enc.input_ids, enc.attention_mask)[0].argmax(-1)
    agreement = (first == want.argmax(-1)).float().mean().item()
    assert agreement >= 0.6, agreement


def test_labels_when_given_only_report_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = write_texts(tmp_path / "texts.jsonl", labelled=True)
    _, store = _adopt(tmp_path, "bert", texts)
    assert "accuracy with the labels" in capsys.readouterr().out
    m = ModelStore(store).load("adopted-bert").manifest
    assert m.provenance.labels_given is True  # type: ignore[attr-defined]
    agreement = m.provenance.agreement_evaluation  # type: ignore[attr-defined]
    assert agreement["per_layer"][-1]["all"] == 1.0  # full depth agrees with itself
    accuracy = m.provenance.test_evaluation  # type: ignore[attr-defined]
    assert accuracy["num_examples"] == agreement["num_examples"] > 0
    assert main(["report", "adopted-bert", "--store", str(store)]) == 0


def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = make_checkpoint("bert", tmp_path / "ckpt", num_steps=1)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({"text": f"t {i}", "label": "purple"}) + "\n" for i in range(30)))
    base = ["adopt", str(checkpoint), "--out", str(tmp_path / "store"), "--no-progress"]
    assert main([*base, "--texts", str(wrong)]) == 1
    assert "not the checkpoint's" in capsys.readouterr().err
    assert main([*base, "--texts", str(tmp_path / "missing.txt")]) == 1
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="unknown format"):
        read_texts(tmp_path / "x.parquet")
    (tmp_path / "x.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no texts"):
        read_texts(tmp_path / "x.txt")
