"""Reference early-exit forward for one batch: the ground truth the serving engine must reproduce.

Rows leave after the ramp where they become confident; the rest continue with the exited rows removed
from every tensor (and padding trimmed to the longest remaining row). Layers count from 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_store.criteria import CRITERION_CODES, Criterion, PatienceState, decide_exits, threshold_for
from model_store.early_exit import EarlyExitClassifier


@dataclass(frozen=True)
class RowResult:
    """What one input row got: its label index, probabilities, and where it left."""

    label_index: int
    probs: list[float]
    exit_layer: int  # 1-based ramp that answered
    num_layers_run: int  # encoder layers computed for this row


@dataclass(frozen=True)
class RowPolicies:
    """Per-row exit policy, one entry per row: criterion code, native threshold, layer cap (1-based)."""

    criterion_codes: torch.Tensor  # long
    thresholds: torch.Tensor  # float
    max_layers: torch.Tensor  # long, in [1, num_layers]

    @staticmethod
    def from_rows(
        criteria: list[Criterion],
        speeds: list[float],
        max_layers: list[int | None],
        num_labels: int,
        num_layers: int,
        device: torch.device | str = "cpu",
    ) -> RowPolicies:
        """Build per-row tensors from per-row speeds (see ``criteria.threshold_for``)."""
        return RowPolicies(
            criterion_codes=torch.tensor(
                [CRITERION_CODES[c] for c in criteria], dtype=torch.long, device=device
            ),
            thresholds=torch.tensor(
                [threshold_for(c, s, num_labels, num_layers) for c, s in zip(criteria, speeds, strict=True)],
                dtype=torch.float32,
                device=device,
            ),
            max_layers=torch.tensor(
                [num_layers if m is None else min(m, num_layers) for m in max_layers],
                dtype=torch.long,
                device=device,
            ),
        )

    def select(self, rows: torch.Tensor) -> RowPolicies:
        return RowPolicies(
            self.criterion_codes.index_select(0, rows),
            self.thresholds.index_select(0, rows),
            self.max_layers.index_select(0, rows),
        )


def trim_padding(hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing pad columns that no remaining row needs (padding is on the right)."""
    longest = int(attention_mask.sum(dim=1).max())
    return hidden[:, :longest], attention_mask[:, :longest]


@torch.inference_mode()
def early_exit_forward(
    model: EarlyExitClassifier,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    policies: RowPolicies,
) -> list[RowResult]:
    """Run ``model`` layer by layer with per-row exits; returns one ``RowResult`` per input row."""
    num_rows = input_ids.shape[0]
    results: list[RowResult | None] = [None] * num_rows
    original_rows = torch.arange(num_rows)
    hidden = model.embed(input_ids, attention_mask)
    patience = PatienceState.initial(num_rows, device=input_ids.device)
    for layer in range(1, model.num_layers + 1):
        hidden = model.run_layer(layer, hidden, attention_mask)
        logits = model.ramp_logits(layer, hidden, attention_mask)
        exits, patience = decide_exits(logits, policies.criterion_codes, policies.thresholds, patience)
        exits = exits | (policies.max_layers <= layer)
        if layer == model.num_layers:
            exits = torch.ones_like(exits)
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        for i in exits.nonzero().flatten().tolist():
            results[int(original_rows[i])] = RowResult(
                label_index=int(probs[i].argmax()),
                probs=probs[i].tolist(),
                exit_layer=layer,
                num_layers_run=layer,
            )
        keep = (~exits).nonzero().flatten()
        if keep.numel() == 0:
            break
        hidden, attention_mask = trim_padding(
            hidden.index_select(0, keep), attention_mask.index_select(0, keep)
        )
        policies = policies.select(keep)
        patience = patience.select(keep)
        original_rows = original_rows.index_select(0, keep.cpu())
    assert all(r is not None for r in results), "the last layer always answers"
    return [r for r in results if r is not None]
