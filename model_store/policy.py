"""Exit criteria names and the speed -> threshold mapping. Pure Python (no torch), so the scheduler and
the API can use them; the tensor side lives in ``criteria.py``. See ``criteria.py`` for the semantics."""

from __future__ import annotations

import math
from enum import StrEnum


class Criterion(StrEnum):
    """How a ramp decides that a row is confident enough to leave."""

    NORMALIZED_ENTROPY = "normalized_entropy"
    ENTROPY = "entropy"
    MAX_PROB = "max_prob"
    PATIENCE = "patience"


# Stable integer codes so a batch can carry one criterion per row as a tensor.
CRITERION_CODES: dict[Criterion, int] = {criterion: code for code, criterion in enumerate(Criterion)}


def threshold_for(criterion: Criterion, speed: float, num_labels: int, num_layers: int) -> float:
    """The native threshold of ``criterion`` for a speed in [0, 1] (semantics: ``model_store.criteria``)."""
    if not 0.0 <= speed <= 1.0 or math.isnan(speed):
        raise ValueError(f"speed must be within [0, 1], got {speed}")
    if criterion is Criterion.NORMALIZED_ENTROPY:
        return math.inf if speed >= 1.0 else speed
    if criterion is Criterion.ENTROPY:
        return math.inf if speed >= 1.0 else speed * math.log(num_labels)
    if criterion is Criterion.MAX_PROB:
        if speed <= 0.0:
            return math.inf
        if speed >= 1.0:
            return -math.inf
        return 1.0 - speed * (1.0 - 1.0 / num_labels)
    if criterion is Criterion.PATIENCE:
        return float(round((1.0 - speed) * (num_layers - 1)))
    raise ValueError(f"unknown criterion {criterion!r}")
