"""The device work of one layer step, as one function of tensors: layer, ramp, exit decision, packing.

The eager runner calls it on a cohort's own tensors; the CUDA-graph path (``server/engine/graphs.py``)
captures the same function on static, bucket-sized buffers. Nothing in it reads a value back to the host,
so on a GPU the step queues its kernels and the caller decides when to wait (once, for ``packed``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_store.criteria import PatienceState, decide_exits
from model_store.early_exit import EarlyExitClassifier


@dataclass(frozen=True)
class StepTensors:
    """What one step produces on the device."""

    hidden: torch.Tensor  # (rows, seq, hidden): the layer's output, the survivors' next input
    packed: torch.Tensor  # (rows, 1 + labels) float32: [exit flag, probabilities...], the one transfer
    patience: PatienceState


def compute_step(
    model: EarlyExitClassifier,
    layer: int,
    hidden: torch.Tensor,
    layer_mask: torch.Tensor | None,
    mask: torch.Tensor,
    criterion_codes: torch.Tensor,
    thresholds: torch.Tensor,
    max_layers: torch.Tensor,
    patience: PatienceState,
) -> StepTensors:
    """Run layer ``layer`` (1-based), its ramp (float32) and every row's exit decision."""
    hidden = model.run_layer_masked(layer, hidden, layer_mask)
    logits = model.ramp_logits(layer, hidden, mask)
    exits, patience = decide_exits(logits, criterion_codes, thresholds, patience)
    exits = exits | (max_layers <= layer)
    if layer >= model.num_layers:
        exits = torch.ones_like(exits)
    probs = torch.softmax(logits.float(), dim=-1)
    packed = torch.cat([exits.to(probs.dtype).unsqueeze(1), probs], dim=1)
    return StepTensors(hidden, packed, patience)
