"""The frozen-feature baseline every recipe must beat, and the comparison at fixed mean-exit budgets.

The probe: the **base** encoder, not fine-tuned, its mean-pooled hidden state after every layer, and one
logistic regression per layer (standardised features, L2, full-batch L-BFGS) trained on the train split.
Its per-layer logits exit like a model's ramps (``simulate_exits``). A recipe whose ramps lose to this at
the same number of layers has a bug or a bad setting.

The comparison, for the model and the probe alike: for each budget of mean exit layers (1.0, 1.25, 1.5,
2.0), every (criterion, speed) setting is simulated on dev; among those whose dev mean exit layer is
within the budget, the most accurate on dev is taken, and its **test** accuracy and mean exit layer are
reported. So both are judged by the same rule, chosen on dev, measured on test.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model_store.calibration import DEFAULT_SPEEDS, simulate_exits
from model_store.criteria import Criterion
from model_store.early_exit import EarlyExitClassifier
from model_store.training.features import TokenizedSet, collect_pooled_features

BUDGETS = (1.0, 1.25, 1.5, 2.0)
L2 = 1e-3


def fit_linear(features: torch.Tensor, labels: torch.Tensor, num_labels: int) -> nn.Linear:
    """Multinomial logistic regression with L2 by full-batch L-BFGS (features already standardised)."""
    torch.manual_seed(0)
    head = nn.Linear(features.shape[1], num_labels)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels) + L2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return head.eval()


class FrozenProbe:
    """Per-layer logistic regressions on a frozen encoder's pooled features."""

    def __init__(self, encoder_model: EarlyExitClassifier, batch_size: int = 32) -> None:
        self.encoder_model = encoder_model.eval()
        self.batch_size = batch_size
        self.heads: list[nn.Linear] = []
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def fit(self, train: TokenizedSet, num_labels: int) -> FrozenProbe:
        features = collect_pooled_features(self.encoder_model, train, self.batch_size)
        self.mean = features.mean(dim=0, keepdim=True)
        self.std = features.std(dim=0, keepdim=True).clamp_min(1e-6)
        scaled = (features - self.mean) / self.std
        self.heads = [fit_linear(scaled[:, k], train.labels, num_labels) for k in range(scaled.shape[1])]
        return self

    @torch.inference_mode()
    def layer_logits(self, data: TokenizedSet) -> torch.Tensor:
        """``(rows, num_layers, num_labels)``, as ``collect_ramp_logits`` gives for a model."""
        assert self.mean is not None and self.std is not None, "fit first"
        scaled = (collect_pooled_features(self.encoder_model, data, self.batch_size) - self.mean) / self.std
        return torch.stack([head(scaled[:, k]) for k, head in enumerate(self.heads)], dim=1)


def best_within_budgets(
    dev_logits: torch.Tensor,
    dev_labels: torch.Tensor,
    test_logits: torch.Tensor,
    test_labels: torch.Tensor,
    budgets: tuple[float, ...] = BUDGETS,
) -> list[dict[str, Any]]:
    """Per budget: the setting most accurate on dev with a dev mean exit layer within it, on test."""
    candidates = []
    for criterion in Criterion:
        for speed in DEFAULT_SPEEDS:
            dev = simulate_exits(dev_logits, criterion, speed)
            candidates.append(
                (
                    float(dev.exit_layer.float().mean()),
                    float((dev.predictions == dev_labels).float().mean()),
                    criterion,
                    speed,
                )
            )
    out: list[dict[str, Any]] = []
    for budget in budgets:
        fitting = [c for c in candidates if c[0] <= budget + 1e-9]
        if not fitting:
            out.append({"budget": budget, "setting": None})
            continue
        dev_mean, dev_acc, criterion, speed = max(fitting, key=lambda c: (c[1], -c[0]))
        test = simulate_exits(test_logits, criterion, speed)
        out.append(
            {
                "budget": budget,
                "setting": {"criterion": criterion.value, "speed": speed},
                "dev_accuracy": dev_acc,
                "dev_mean_exit_layer": dev_mean,
                "test_accuracy": float((test.predictions == test_labels).float().mean()),
                "test_mean_exit_layer": float(test.exit_layer.float().mean()),
            }
        )
    return out


def compare_with_probe(
    base_model: EarlyExitClassifier,
    train: TokenizedSet,
    dev: TokenizedSet,
    test: TokenizedSet,
    model_dev_logits: torch.Tensor,
    model_test_logits: torch.Tensor,
    num_labels: int,
    batch_size: int = 32,
) -> dict[str, Any]:
    """The model and the frozen probe at each budget (see the module docstring), plus the probe's test
    accuracy per layer."""
    probe = FrozenProbe(base_model, batch_size).fit(train, num_labels)
    probe_dev, probe_test = probe.layer_logits(dev), probe.layer_logits(test)
    model_rows = best_within_budgets(model_dev_logits, dev.labels, model_test_logits, test.labels)
    probe_rows = best_within_budgets(probe_dev, dev.labels, probe_test, test.labels)
    return {
        "budgets": [
            {"budget": m["budget"], "model": m, "probe": p}
            for m, p in zip(model_rows, probe_rows, strict=True)
        ],
        "probe_per_layer_test_accuracy": [
            float((probe_test[:, k].argmax(-1) == test.labels).float().mean())
            for k in range(probe_test.shape[1])
        ],
    }


def format_comparison(comparison: dict[str, Any]) -> str:
    """A markdown table: the model against the frozen probe at each mean-exit budget (test split)."""
    lines = [
        "| mean exit layers at most (on dev) | model: setting | model test % (mean layers) | "
        "frozen probe: setting | probe test % (mean layers) |",
        "|---|---|---|---|---|",
    ]
    for row in comparison["budgets"]:
        cells = []
        for side in ("model", "probe"):
            r = row[side]
            if r.get("setting") is None:
                cells += ["none fits", "—"]
                continue
            s = r["setting"]
            cells += [
                f"{s['criterion']} {s['speed']:g}",
                f"{100 * r['test_accuracy']:.2f} ({r['test_mean_exit_layer']:.2f})",
            ]
        lines.append(f"| {row['budget']:g} | " + " | ".join(cells) + " |")
    per_layer = ", ".join(f"{100 * a:.2f}" for a in comparison["probe_per_layer_test_accuracy"])
    lines += ["", f"Frozen probe, test accuracy per layer (%): {per_layer}."]
    return "\n".join(lines)
