"""Calibration: the simulated sweep is monotone, equals the reference forward, and picks the default."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from model_store.calibration import (
    calibrate,
    format_table,
    pick_default,
    plot_calibration,
    simulate_exits,
    verify_simulation,
)
from model_store.criteria import Criterion
from model_store.manifest import CalibrationPoint, CalibrationTable
from model_store.training.features import TokenizedSet, collect_ramp_logits
from tests.model_store.conftest import padded_batch, tiny_model


def random_logits(num_rows: int = 200, num_layers: int = 6, num_labels: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    # Confidence grows with depth, as in a trained model, with plenty of disagreement between layers.
    scale = torch.linspace(0.5, 4.0, num_layers).view(1, -1, 1)
    return torch.randn(num_rows, num_layers, num_labels, generator=gen) * scale


@pytest.mark.parametrize("criterion", list(Criterion))
def test_mean_exit_layer_never_rises_as_speed_rises(criterion: Criterion) -> None:
    logits = random_logits()
    labels = logits[:, -1].argmax(-1)
    table = calibrate(logits, labels, split="dev", criteria=(criterion,))
    exits = [p.mean_exit_layer for p in sorted(table.points, key=lambda p: p.speed)]
    assert all(b <= a for a, b in itertools.pairwise(exits)), exits
    assert exits[0] == 6.0 and exits[-1] == 1.0  # speed 0 = full depth, speed 1 = first ramp
    assert len(set(exits)) > 2  # the knob does something in between


def test_simulation_equals_reference_forward(kind: str) -> None:
    model = tiny_model(kind, num_labels=3, seed=2)
    ids, mask = padded_batch([5, 9, 3, 12, 7, 8, 4, 10], pad_id=1 if kind == "roberta" else 0)
    data = TokenizedSet(
        [ids[i, : int(mask[i].sum())] for i in range(8)], torch.zeros(8, dtype=torch.long), ["x"] * 8, 0
    )
    with torch.no_grad():
        scale = torch.linspace(0.2, 3.0, model.num_layers)
        for k, ramp in enumerate(model.ramps):  # spread the confidences so that rows exit at many layers
            ramp.out.weight.mul_(30 * scale[k])
    logits = collect_ramp_logits(model, data)
    speeds = (0.0, 0.3, 0.6, 0.9, 1.0)
    assert verify_simulation(model, ids, mask, logits, speeds=speeds) == 8 * len(speeds) * len(Criterion)
    layers = {int(x) for s in speeds for x in simulate_exits(logits, Criterion.MAX_PROB, s).exit_layer}
    assert len(layers) >= 3


def test_verify_simulation_catches_a_mismatch() -> None:
    model = tiny_model("bert", num_labels=3)
    ids, mask = padded_batch([4, 6], pad_id=0)
    wrong = torch.zeros(2, model.num_layers, 3)
    wrong[:, :, 2] = 10.0  # confident in label 2 everywhere: exits at layer 1 at any speed > 0
    with pytest.raises(AssertionError, match="simulation differs"):
        verify_simulation(model, ids, mask, wrong, speeds=(0.5,))


def test_table_values_on_hand_made_logits() -> None:
    # 4 rows, 2 layers, 2 labels. Layer 1 is confident and right on rows 0-1, unsure on rows 2-3.
    logits = torch.tensor(
        [
            [[5.0, -5.0], [5.0, -5.0]],
            [[-5.0, 5.0], [-5.0, 5.0]],
            [[0.1, 0.0], [-3.0, 3.0]],
            [[0.0, 0.1], [3.0, -3.0]],
        ]
    )
    labels = torch.tensor([0, 1, 1, 0])
    table = calibrate(logits, labels, "dev", criteria=(Criterion.NORMALIZED_ENTROPY,), speeds=(0.0, 0.5, 1.0))
    assert table.per_layer_accuracy == [0.5, 1.0]
    assert table.full_depth_accuracy == 1.0
    by_speed = {p.speed: p for p in table.points}
    assert (by_speed[0.0].accuracy, by_speed[0.0].mean_exit_layer) == (1.0, 2.0)
    assert (by_speed[0.5].accuracy, by_speed[0.5].mean_exit_layer) == (1.0, 1.5)
    assert by_speed[0.5].expected_speedup == pytest.approx(2 / 1.5)
    assert (by_speed[1.0].accuracy, by_speed[1.0].mean_exit_layer, by_speed[1.0].accuracy_drop) == (
        0.5,
        1.0,
        0.5,
    )
    assert pick_default(table) == by_speed[0.5]
    assert "| normalized_entropy | 0.50 | 100.00 | +0.00 | 1.50 | 25.0 | 1.33x |" in format_table(table)
    # Agreement of early exits with full depth: none leave at speed 0; at 0.5 rows 0-1 leave and agree;
    # at 1.0 all four leave after layer 1 and rows 2-3 disagree with layer 2.
    assert by_speed[0.0].early_exit_agreement is None
    assert by_speed[0.5].early_exit_agreement == 1.0
    assert by_speed[1.0].early_exit_agreement == 0.5


def test_recalibrate_saves_a_new_version_with_agreement(tmp_path: Path) -> None:
    import json

    from model_store.training.pipeline import recalibrate
    from tests.tiny_models import save_tiny_store

    store = save_tiny_store(tmp_path / "store", labels=("a", "b", "c"))
    rows = [{"text": f"example number {i} " + "word " * (i % 7), "label": "abc"[i % 3]} for i in range(90)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = recalibrate(store.root, "tiny", None, data=str(data), show_progress=False)
    assert path == store.root / "tiny" / "2"
    recalibrated = store.load("tiny", "2")
    assert recalibrated.manifest.provenance.model_dump()["recalibrated_from"] == "1"
    assert recalibrated.manifest.calibration is not None
    agreements = [p.early_exit_agreement for p in recalibrated.manifest.calibration.points if p.speed == 1.0]
    assert all(a is not None and 0.0 <= a <= 1.0 for a in agreements)
    original = store.load("tiny", "1")
    for name, tensor in original.model.state_dict().items():
        assert torch.equal(tensor, recalibrated.model.state_dict()[name])


def test_pick_default_takes_the_fastest_within_half_a_point() -> None:
    def point(speed: float, accuracy: float, mean_exit: float) -> CalibrationPoint:
        return CalibrationPoint(
            criterion=Criterion.MAX_PROB,
            speed=speed,
            accuracy=accuracy,
            mean_exit_layer=mean_exit,
            layers_saved=1 - mean_exit / 6,
            expected_speedup=6 / mean_exit,
        )

    table = CalibrationTable(
        split="dev",
        num_examples=1000,
        full_depth_accuracy=0.980,
        points=[
            point(0.0, 0.980, 6.0),
            point(0.5, 0.976, 2.0),
            point(0.7, 0.974, 1.5),
            point(0.9, 0.96, 1.1),
        ],
    )
    assert pick_default(table).speed == 0.5


def test_plot_writes_a_png(tmp_path: Path) -> None:
    logits = random_logits(50)
    table = calibrate(logits, logits[:, -1].argmax(-1), "dev")
    path = plot_calibration(table, tmp_path / "c.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accuracy_drop_upper_bound_exact() -> None:
    from model_store.calibration import accuracy_drop_upper_bound

    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    full = labels.clone()
    full[9] = 0  # full depth wrong on row 9
    early = labels.clone()
    early[0], early[1] = 1, 0  # early wrong on rows 0-1 (full right there): 2 worse
    early[9] = 1  # early right where full is wrong: 1 better
    bound = accuracy_drop_upper_bound(early, full, labels)
    assert bound == pytest.approx((2 - 1 + 1.645 * 3**0.5) / 10)
    assert accuracy_drop_upper_bound(full, full, labels) == 0.0  # identical answers: no drop, no doubt
