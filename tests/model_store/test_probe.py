"""The frozen-feature probe baseline and the budget comparison."""

from __future__ import annotations

import torch

from model_store.training.probe import BUDGETS, best_within_budgets, fit_linear, format_comparison


def _logits(
    num_rows: int, confident_from: list[int], labels: torch.Tensor, num_layers: int = 4
) -> torch.Tensor:
    """Each row is uncertain until layer ``confident_from[row]``, then confidently right."""
    out = torch.zeros(num_rows, num_layers, 2)
    for row in range(num_rows):
        for layer in range(num_layers):
            if layer + 1 >= confident_from[row]:
                out[row, layer, int(labels[row])] = 8.0
            else:
                out[row, layer, 1 - int(labels[row])] = 0.1  # slightly wrong, unsure
    return out


def test_budget_choice_is_made_on_dev_and_measured_on_test() -> None:
    labels = torch.tensor([0, 1] * 20)
    easy = _logits(40, [1] * 40, labels)  # right and sure at layer 1
    mixed = _logits(40, [1] * 20 + [3] * 20, labels)  # half the rows need 3 layers
    rows = best_within_budgets(mixed, labels, mixed, labels)
    assert [r["budget"] for r in rows] == list(BUDGETS)
    at_one = rows[0]
    assert at_one["test_mean_exit_layer"] == 1.0 and at_one["test_accuracy"] == 0.5
    at_two = rows[-1]
    assert at_two["dev_mean_exit_layer"] <= 2.0 and at_two["test_accuracy"] == 1.0  # exits at 1 or 3
    assert best_within_budgets(easy, labels, easy, labels)[0]["test_accuracy"] == 1.0


def test_logistic_regression_separates_separable_data() -> None:
    torch.manual_seed(0)
    x = torch.randn(200, 8)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    head = fit_linear(x, y, 2)
    assert (head(x).argmax(-1) == y).float().mean() >= 0.97


def test_comparison_table() -> None:
    row = {
        "setting": {"criterion": "max_prob", "speed": 0.5},
        "test_accuracy": 0.97,
        "test_mean_exit_layer": 1.1,
    }
    text = format_comparison({
        "budgets": [{"budget": 1.0, "model": row, "probe": {"budget": 1.0, "setting": None}}],
        "probe_per_layer_test_accuracy": [0.9, 0.95],
    })  # fmt: skip
    assert "| 1 | max_prob 0.5 | 97.00 (1.10) | none fits | — |" in text
    assert "90.00, 95.00" in text
