"""Training defaults that fit the data: every row unless capped, the length chosen from the data, early
stopping on the dev loss, a time budget, and --help stating every default."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from model_store.cli import main
from model_store.store import ModelStore
from model_store.training.loop import LoopConfig, train_loop
from tests.model_store.test_cli import tiny_base, write_task  # noqa: F401  (fixture)

pytestmark = pytest.mark.model


def _toy() -> tuple[nn.Linear, list[nn.Parameter], torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    return model, list(model.parameters()), x, y


def test_early_stopping_keeps_the_best_epoch() -> None:
    model, params, x, y = _toy()
    losses = iter([1.0, 0.5, 0.7, 0.2])  # epoch 2 is the best; epoch 3 rose

    snapshots: list[torch.Tensor] = []

    def dev_loss() -> float:
        snapshots.append(model.weight.detach().clone())
        return next(losses)

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x[rows]), y[rows])

    config = LoopConfig(num_epochs=5, batch_size=16, learning_rate=0.1)
    stats = train_loop([model], params, 64, batch_loss, config, "toy", show_progress=False, dev_loss=dev_loss)
    assert stats.stopped == "dev loss rose"
    assert stats.dev_losses == (1.0, 0.5, 0.7)
    assert stats.num_steps == 3 * 4  # three epochs of 4 steps, then it stopped
    assert torch.equal(model.weight, snapshots[1])  # the weights of the best epoch are back


def test_time_budget_stops_a_stage() -> None:
    model, params, x, y = _toy()
    config = LoopConfig(num_epochs=100, batch_size=16, deadline_s=time.time() + 0.2)

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        time.sleep(0.01)
        return nn.functional.cross_entropy(model(x[rows]), y[rows])

    stats = train_loop([model], params, 64, batch_loss, config, "toy", show_progress=False)
    assert stats.stopped == "time budget" and 0 < stats.num_steps < 400


def test_train_uses_every_row_and_picks_the_length_from_the_data(
    tiny_base: Path,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = write_task(tmp_path / "colours.jsonl", num_rows=150)
    store = tmp_path / "store"
    argv = [
        "train",
        "--recipe",
        "fastbert",
        "--base",
        str(tiny_base),
        "--data",
        str(data),
        "--out",
        str(store),
    ]
    argv += ["--lr", "2e-3", "--batch-size", "8", "--ramp-epochs", "5", "--no-progress", "--threads", "1"]
    argv += ["--time-budget-min", "5", "--precision", "bfloat16"]
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    assert "95th-percentile length" in caplog.text
    manifest = ModelStore(store).load("colours-fastbert").manifest
    assert manifest.max_seq_length == 16  # texts of 3-8 words: 95th percentile rounded up to 8, at least 16
    provenance = manifest.provenance.model_dump()
    assert provenance["budget"]["max_finetune_examples"] is None  # every train row
    stages = provenance["stages"]
    assert stages["fine-tune"]["num_rows_seen"] >= 120  # 150 rows, 80 % train, at least one epoch
    assert provenance["early_stopping"] is True and provenance["time_budget_min"] == 5
    assert provenance["budget"]["finetune_precision"] == "bfloat16"
    assert "fine-tuning precision: bfloat16" in caplog.text
    comparison = provenance["probe_comparison"]  # the frozen-feature baseline, next to the model
    assert [row["budget"] for row in comparison["budgets"]] == [1.0, 1.25, 1.5, 2.0]
    assert len(comparison["probe_per_layer_test_accuracy"]) == 2


def test_help_states_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train_help = capsys.readouterr().out
    for flag in ("--max-seq-length", "--finetune-examples", "--finetune-epochs", "--ramp-epochs",
                 "--time-budget-min", "--lr", "--batch-size", "--threads", "--precision"):  # fmt: skip
        block = train_help.split(f"  {flag}", 1)[1].split("\n  --", 1)[0]
        assert "(default:" in block, flag


def test_the_default_build_uses_every_row_for_two_epochs_within_ten_minutes() -> None:
    from model_store.cli import _default_settings, build_parser

    args = build_parser().parse_args(["build-default", "--precision", "float32"])
    settings = _default_settings(args)
    budget = settings.budget
    assert budget.max_finetune_examples is None and budget.max_ramp_examples is None
    assert budget.finetune_epochs == 2.0 and budget.finetune_precision == "float32"
    assert settings.time_budget_min == 10.0 and settings.early_stopping is False
