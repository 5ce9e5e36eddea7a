"""Exit criteria: pure functions over per-row tensors with per-row thresholds.

Nothing here is stored on a model: every call gets the thresholds of the rows it decides for, so rows of
different requests (different speeds, different criteria) share one batch without racing.

The serving knob is ``speed`` in [0, 1], higher = faster, for every criterion. ``threshold_for`` turns a
speed into the criterion's native threshold:

* ``normalized_entropy`` (FastBERT): exit when H(p) / log N < speed.
* ``entropy`` (DeeBERT): exit when H(p) < threshold in nats; threshold = speed * log N. On the same speed
  it decides exactly like ``normalized_entropy``; it exists so DeeBERT thresholds in nats carry over.
* ``max_prob``: exit when max p >= threshold; threshold = 1 - speed * (1 - 1/N).
* ``patience`` (PABEE): exit once ``patience + 1`` consecutive ramps agree on the label;
  patience = round((1 - speed) * (L - 1)).

Speed 0 never exits early (the final layer always answers); speed 1 exits at the first ramp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model_store.policy import CRITERION_CODES, Criterion, threshold_for

__all__ = [
    "CRITERION_CODES",
    "Criterion",
    "PatienceState",
    "decide_exits",
    "entropy",
    "max_prob",
    "normalized_entropy",
    "threshold_for",
    "update_patience",
]


NORMALIZED_ENTROPY_CODE = CRITERION_CODES[Criterion.NORMALIZED_ENTROPY]
MAX_PROB_CODE = CRITERION_CODES[Criterion.MAX_PROB]
PATIENCE_CODE = CRITERION_CODES[Criterion.PATIENCE]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of softmax(logits), per row. ``(rows, labels) -> (rows,)``."""
    return -_sum_p_log_p(logits)


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy divided by log N: 0 = certain, 1 = uniform. ``(rows, labels) -> (rows,)``."""
    return _sum_p_log_p(logits) / -math.log(logits.shape[-1])


def _sum_p_log_p(logits: torch.Tensor) -> torch.Tensor:
    """Sum of p log p per row: minus the entropy. Dividing it by ``-log N`` gives the normalized entropy
    bit for bit as negating it and dividing by ``log N`` would (IEEE rounding is symmetric in sign), with
    one operation fewer on the step's path; ``tests/model_store/test_criteria.py`` checks both."""
    log_probs = torch.log_softmax(logits if logits.dtype == torch.float32 else logits.float(), dim=-1)
    # ``vecdot`` is the product then the sum (ATen computes it so: the same bits as ``(p * log_p).sum``,
    # checked in the tests), one call instead of two on the step's path.
    return torch.linalg.vecdot(log_probs.exp(), log_probs)


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """Largest class probability per row."""
    return torch.softmax(logits if logits.dtype == torch.float32 else logits.float(), dim=-1).amax(dim=-1)


NO_LABEL = -1  # a row's previous label before its first ramp (PABEE's patience state)


# Built at every layer step: slotted, not frozen (a frozen dataclass builds per field through
# ``object.__setattr__``, ~3x the cost). Nothing mutates it.
@dataclass(slots=True)
class PatienceState:
    """Per-row PABEE state: the previous ramp's label and how many consecutive ramps agreed on it."""

    last_label: torch.Tensor  # long, -1 before the first ramp
    num_agreeing: torch.Tensor  # long, 0 before the first ramp

    @staticmethod
    def initial(num_rows: int, device: torch.device | str = "cpu") -> PatienceState:
        return PatienceState(
            last_label=torch.full((num_rows,), NO_LABEL, dtype=torch.long, device=device),
            num_agreeing=torch.zeros(num_rows, dtype=torch.long, device=device),
        )

    def select(self, rows: torch.Tensor) -> PatienceState:
        """The state of a subset of rows (``rows`` is an index tensor)."""
        return PatienceState(self.last_label.index_select(0, rows), self.num_agreeing.index_select(0, rows))

    @staticmethod
    def concat(states: list[PatienceState]) -> PatienceState:
        return PatienceState(
            torch.cat([s.last_label for s in states]), torch.cat([s.num_agreeing for s in states])
        )


def update_patience(state: PatienceState, labels: torch.Tensor) -> PatienceState:
    """Count one more agreeing ramp where the label repeats, else restart the count at 1."""
    same = labels == state.last_label
    return PatienceState(last_label=labels, num_agreeing=torch.where(same, state.num_agreeing + 1, 1))


def decide_exits(
    logits: torch.Tensor,
    criterion_codes: torch.Tensor,
    thresholds: torch.Tensor,
    patience: PatienceState,
    *,
    only_code: int | None = None,
) -> tuple[torch.Tensor, PatienceState]:
    """Per-row exit decision after one ramp.

    ``criterion_codes`` (long) and ``thresholds`` (float) hold one value per row. Returns a bool tensor
    (True = this row leaves now) and the updated patience state. No host synchronisation.

    ``only_code``: the caller knows every row has this criterion, so only it is evaluated (the same
    operations, so the same decisions); the patience state is then updated only for patience, since no
    other criterion reads it.
    """
    if thresholds.dtype != torch.float32:  # (the serving runner's are float32 already: no call per step)
        thresholds = thresholds.float()
    if only_code is not None:
        if only_code == PATIENCE_CODE:
            patience = update_patience(patience, logits.argmax(dim=-1))
            return patience.num_agreeing >= thresholds + 1, patience
        if only_code == MAX_PROB_CODE:
            return max_prob(logits) >= thresholds, patience
        if only_code == NORMALIZED_ENTROPY_CODE:
            return normalized_entropy(logits) < thresholds, patience
        return entropy(logits) < thresholds, patience  # entropy in nats
    labels = logits.argmax(dim=-1)
    patience = update_patience(patience, labels)
    sum_p_log_p = _sum_p_log_p(logits)
    by_code = torch.stack(
        [
            sum_p_log_p / -math.log(logits.shape[-1]) < thresholds,
            -sum_p_log_p < thresholds,
            max_prob(logits) >= thresholds,
            patience.num_agreeing >= thresholds + 1,
        ]
    )
    exits = by_code.gather(0, criterion_codes.view(1, -1)).squeeze(0)
    return exits, patience
