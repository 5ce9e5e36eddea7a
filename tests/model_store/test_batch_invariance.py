"""A mixed batch gives every row what it would get alone."""

from __future__ import annotations

import torch

from model_store.criteria import Criterion
from model_store.early_exit import EarlyExitClassifier
from model_store.reference import RowPolicies, early_exit_forward
from tests.model_store.conftest import padded_batch, tiny_model


def _sharpen(model: EarlyExitClassifier, factor: float) -> None:
    # Random ramps are near-uniform; scaling them spreads confidences so rows exit at different layers.
    with torch.no_grad():
        for ramp in model.ramps:
            ramp.out.weight.mul_(factor)


def test_mixed_batch_equals_rows_alone(kind: str) -> None:
    model = tiny_model(kind, num_labels=3, seed=3)
    _sharpen(model, 10.0)
    pad = model.encoder.config.pad_token_id or 0
    lengths = [3, 11, 7, 2, 12, 5, 9, 4, 8, 6, 10, 1]
    ids, mask = padded_batch(lengths, pad_id=pad, seed=5)
    criteria = list(Criterion) * 3
    speeds = [0.0, 0.7, 0.75, 0.5, 0.8, 0.85, 0.9, 1.0, 0.65, 0.3, 0.72, 0.68]
    max_layers = [None, None, 3, None, 2, None, None, None, None, 1, None, None]
    policies = RowPolicies.from_rows(criteria, speeds, max_layers, 3, model.num_layers)

    batched = early_exit_forward(model, ids, mask, policies)
    exit_layers = {r.exit_layer for r in batched}
    assert len(exit_layers) >= 3, f"test needs rows leaving at several layers, got {exit_layers}"
    for row, n in enumerate(lengths):
        alone = early_exit_forward(
            model, ids[row : row + 1, :n], mask[row : row + 1, :n], policies.select(torch.tensor([row]))
        )[0]
        got = batched[row]
        assert got.exit_layer == alone.exit_layer, f"row {row}"
        assert got.num_layers_run == alone.num_layers_run
        assert got.label_index == alone.label_index
        assert torch.allclose(torch.tensor(got.probs), torch.tensor(alone.probs), atol=1e-5)
    assert batched[9].exit_layer == 1  # max_layers=1
    assert batched[7].exit_layer == 1  # speed 1
