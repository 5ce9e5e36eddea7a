"""The device work of one layer step, as functions of tensors: layer, ramp, exit decision, packing.

``compute_step`` is all of it; the CUDA-graph path (``server/engine/graphs.py``) captures it on static,
bucket-sized buffers and the eager runner on a GPU calls it on a cohort's own tensors. Nothing in it reads
a value back to the host, so on a GPU the step queues its kernels and the caller decides when to wait
(once, for ``packed``). On a CPU, where reading a tensor is no transfer, the runner calls its two halves:
``decide_step``, reads the exit flags, and ``host_results`` (the labels and probabilities, read as lists:
no packing) only when a row leaves (most steps of a deep model carry every row on: nothing for them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_store.criteria import PatienceState, decide_exits
from model_store.early_exit import EarlyExitClassifier


# Built at every layer step: slotted, not frozen (a frozen dataclass builds per field through
# ``object.__setattr__``, ~3x the cost). Nothing mutates it.
@dataclass(slots=True)
class StepTensors:
    """What one step produces on the device."""

    hidden: torch.Tensor  # (rows, seq, hidden): the layer's output, the survivors' next input
    packed: torch.Tensor  # (rows, PACKED_HEAD + labels) float32: [exit flag, label, probs...], one transfer
    patience: PatienceState


@dataclass(slots=True)
class DecidedStep:
    """A step up to its exit decision: what a reader of the flags alone needs (``pack_results`` adds
    the labels and probabilities of the rows that leave)."""

    hidden: torch.Tensor  # (rows, seq, hidden): the layer's output
    logits: torch.Tensor  # (rows, labels) float32: the ramp's
    exits: torch.Tensor  # (rows,) bool: True = the row leaves at this layer
    patience: PatienceState


PACKED_HEAD = 2  # columns of ``packed`` before the probabilities: the exit flag and the label index


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
    *,
    only_code: int | None = None,
    capped: bool = True,
) -> StepTensors:
    """Run layer ``layer`` (1-based), its ramp (float32), every row's exit decision, and pack the
    result for its one transfer: ``decide_step`` then ``pack_results``."""
    decided = decide_step(
        model, layer, hidden, layer_mask, mask, criterion_codes, thresholds, max_layers, patience,
        only_code=only_code, capped=capped,
    )  # fmt: skip
    return StepTensors(decided.hidden, pack_results(decided.exits, decided.logits), decided.patience)


def decide_step(
    model: EarlyExitClassifier,
    layer: int,
    hidden: torch.Tensor,
    layer_mask: torch.Tensor | None,
    mask: torch.Tensor,
    criterion_codes: torch.Tensor,
    thresholds: torch.Tensor,
    max_layers: torch.Tensor,
    patience: PatienceState,
    *,
    only_code: int | None = None,
    capped: bool = True,
) -> DecidedStep:
    """Run layer ``layer`` (1-based), its ramp (float32) and every row's exit decision.

    What the host knows of the batch saves device work, never changes a decision: ``only_code`` (every
    row has this criterion: only it is evaluated, see ``decide_exits``) and ``capped=False`` (no row's
    ``max_layers`` is reached at this layer). At the model's last layer every row leaves, so nothing is
    decided there. The captured graphs call it without either (every criterion, every cap)."""
    hidden = model.run_layer_masked(layer, hidden, layer_mask)
    logits = model.ramp_logits(layer, hidden, mask, ramp_dtype=torch.float32)
    if layer >= model.num_layers:
        exits = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    else:
        exits, patience = decide_exits(logits, criterion_codes, thresholds, patience, only_code=only_code)
        if capped:
            exits = exits | (max_layers <= layer)
    return DecidedStep(hidden, logits, exits, patience)


def pack_results(exits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``(rows, PACKED_HEAD + labels)`` float32: each row's exit flag, label index and probabilities.

    [flag, label] as integers (stack promotes the flag), then float32 next to the probabilities (cat
    promotes): two operations where converting and reshaping each column took five."""
    probs = torch.softmax(logits, dim=-1)
    labels = probs.argmax(dim=-1)
    return torch.cat([torch.stack([exits, labels], dim=1), probs], dim=1)


def host_results(logits: torch.Tensor) -> tuple[list[int], list[list[float]]]:
    """Each row's label index and probabilities, read into lists: what ``pack_results`` holds for a
    row (the same softmax and argmax, bit for bit), for a runner that reads tensors where they are (a
    CPU): two reads and no packing operations."""
    probs = torch.softmax(logits, dim=-1)
    labels: list[int] = probs.argmax(dim=-1).tolist()
    return labels, probs.tolist()
