"""Exit criteria semantics, on pure tensors and through the reference forward."""

from __future__ import annotations

import math

import pytest
import torch

from model_store.criteria import (
    CRITERION_CODES,
    Criterion,
    PatienceState,
    decide_exits,
    entropy,
    max_prob,
    normalized_entropy,
    threshold_for,
)
from model_store.reference import RowPolicies, early_exit_forward
from tests.model_store.conftest import padded_batch, tiny_model


def _run(kind: str, criterion: Criterion, speed: float) -> list[int]:
    model = tiny_model(kind, num_labels=4, seed=7)
    ids, mask = padded_batch([6, 3, 9, 2], pad_id=model.encoder.config.pad_token_id or 0)
    policies = RowPolicies.from_rows([criterion] * 4, [speed] * 4, [None] * 4, 4, model.num_layers)
    return [r.exit_layer for r in early_exit_forward(model, ids, mask, policies)]


@pytest.mark.parametrize("criterion", list(Criterion))
def test_speed_zero_runs_every_layer(kind: str, criterion: Criterion) -> None:
    assert _run(kind, criterion, 0.0) == [4, 4, 4, 4]


@pytest.mark.parametrize("criterion", list(Criterion))
def test_speed_one_exits_at_first_ramp(kind: str, criterion: Criterion) -> None:
    assert _run(kind, criterion, 1.0) == [1, 1, 1, 1]


def _decide(logits: torch.Tensor, criterion: Criterion, threshold: float, state: PatienceState):
    rows = logits.shape[0]
    codes = torch.full((rows,), CRITERION_CODES[criterion], dtype=torch.long)
    return decide_exits(logits, codes, torch.full((rows,), threshold), state)


@pytest.mark.parametrize("patience", [0, 1, 2, 3])
def test_patience_exits_after_p_plus_one_agreeing_ramps(patience: int) -> None:
    # Ramp labels per layer: 2, 0, 0, 0, 0, 0 -> the run of agreement starts at ramp 2.
    labels_per_ramp = [2, 0, 0, 0, 0, 0]
    state = PatienceState.initial(1)
    exit_at = None
    for ramp, label in enumerate(labels_per_ramp, start=1):
        logits = torch.full((1, 3), -5.0)
        logits[0, label] = 5.0
        exits, state = _decide(logits, Criterion.PATIENCE, float(patience), state)
        if bool(exits[0]):
            exit_at = ramp
            break
    # patience 0: the first ramp alone suffices; otherwise the run 0,0,... starting at ramp 2 must last p+1.
    assert exit_at == (1 if patience == 0 else 2 + patience)


def test_patience_from_speed() -> None:
    assert threshold_for(Criterion.PATIENCE, 1.0, 2, 12) == 0
    assert threshold_for(Criterion.PATIENCE, 0.0, 2, 12) == 11
    assert threshold_for(Criterion.PATIENCE, 0.5, 2, 12) == round(5.5)


def test_max_prob_threshold_respected(kind: str) -> None:
    model = tiny_model(kind, num_labels=3, seed=11)
    with torch.no_grad():
        for ramp in model.ramps:
            ramp.out.weight.mul_(30.0)
    ids, mask = padded_batch([5, 8, 3, 7, 6, 4, 9, 2], pad_id=model.encoder.config.pad_token_id or 0, seed=2)
    speed = 0.6
    threshold = threshold_for(Criterion.MAX_PROB, speed, 3, model.num_layers)
    assert threshold == pytest.approx(1 - 0.6 * (2 / 3))
    policies = RowPolicies.from_rows([Criterion.MAX_PROB] * 8, [speed] * 8, [None] * 8, 3, model.num_layers)
    results = early_exit_forward(model, ids, mask, policies)
    with torch.inference_mode():
        per_layer = [max_prob(logits) for logits in model.all_ramp_logits(ids, mask)]
    assert {r.exit_layer for r in results} != {model.num_layers}, "some row should exit early"
    for row, result in enumerate(results):
        for layer in range(1, result.exit_layer):
            assert per_layer[layer - 1][row] < threshold
        if result.exit_layer < model.num_layers:
            assert per_layer[result.exit_layer - 1][row] >= threshold
            assert max(result.probs) >= threshold


def test_entropy_functions_exact() -> None:
    uniform = torch.zeros(1, 4)
    assert normalized_entropy(uniform).item() == pytest.approx(1.0)
    certain = torch.tensor([[100.0, 0.0, 0.0, 0.0]])
    assert normalized_entropy(certain).item() == pytest.approx(0.0, abs=1e-6)
    assert threshold_for(Criterion.ENTROPY, 0.5, 4, 6) == pytest.approx(0.5 * math.log(4))


def test_normalized_entropy_is_bit_for_bit_the_entropy_over_log_n() -> None:
    # ``normalized_entropy`` divides the sum of p log p by -log N, one operation fewer than negating it
    # first: the exit decision must not move by a single bit (thresholds sit anywhere, ties included).
    generator = torch.Generator().manual_seed(5)
    for num_labels in (2, 3, 7):
        logits = torch.randn(4096, num_labels, generator=generator) * 4.0
        expected = entropy(logits) / math.log(num_labels)
        assert torch.equal(normalized_entropy(logits), expected)
        # and the entropy is the textbook sum of p log p, bit for bit, whatever call computes it (the
        # calibrated thresholds were found with it)
        log_probs = torch.log_softmax(logits, dim=-1)
        assert torch.equal(entropy(logits), -(log_probs.exp() * log_probs).sum(dim=-1))


@pytest.mark.parametrize("speed", [-0.1, 1.5, float("nan")])
def test_speed_out_of_range_refused(speed: float) -> None:
    with pytest.raises(ValueError, match="speed"):
        threshold_for(Criterion.NORMALIZED_ENTROPY, speed, 2, 6)


@pytest.mark.parametrize("criterion", list(Criterion))
def test_one_known_criterion_decides_as_the_general_path(criterion: Criterion) -> None:
    # The serving path evaluates only the criterion every row of a batch shares; over several ramps the
    # exits (and, for patience, the state) must be those of the path that evaluates all four.
    generator = torch.Generator().manual_seed(3)
    rows, code = 64, CRITERION_CODES[criterion]
    codes = torch.full((rows,), code, dtype=torch.long)
    thresholds = torch.rand(rows, generator=generator) * (3.0 if criterion is Criterion.PATIENCE else 0.9)
    general, only = PatienceState.initial(rows), PatienceState.initial(rows)
    num_exits = 0
    for _ in range(4):
        logits = torch.randn(rows, 3, generator=generator) * 3.0
        expected, general = decide_exits(logits, codes, thresholds, general)
        exits, only = decide_exits(logits, codes, thresholds, only, only_code=code)
        assert torch.equal(exits, expected)
        num_exits += int(exits.sum())
        if criterion is Criterion.PATIENCE:
            assert torch.equal(only.num_agreeing, general.num_agreeing)
            assert torch.equal(only.last_label, general.last_label)
    assert 0 < num_exits < 4 * rows  # the thresholds split the rows: the comparison is not vacuous
