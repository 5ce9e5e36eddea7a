"""Does the trust figure hold? The stated agreement (``manifest.AgreementTable``, counted on the dev
split) against the agreement observed on another split, per (exit layer, confidence bin).

Two views of the held-out split:

* **as defined**: every row where a confidence-threshold policy could exit it (its confidence at that
  layer at least every earlier ramp's), each row once per layer: the population the figure is stated
  for;
* **as served**: the exits the calibrated settings really make (one criterion's speeds), each row once per
  exit layer: what callers see in replies.

The figure is stated per cell (adjacent confidence bins of a layer merged to enough dev rows, see
``AgreementTable``), so it is checked per cell. A cell holds when the observed share is within
``TOLERANCE`` of the stated figure, or the stated figure is inside the observed share's 95 % (Wilson)
interval: with a few dozen rows a cell's share moves by more than 3 points by chance alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from model_store.calibration import exit_candidates, simulate_exits
from model_store.manifest import AgreementTable
from model_store.policy import Criterion

TOLERANCE = 0.03
Z_95 = 1.96


@dataclass(frozen=True)
class BinCheck:
    layer: int
    bin_label: str
    stated: float
    num_rows: int
    num_agreed: int
    low: float  # 95 % Wilson interval of the observed share
    high: float

    @property
    def observed(self) -> float:
        return self.num_agreed / self.num_rows

    @property
    def holds(self) -> bool:
        return abs(self.observed - self.stated) <= TOLERANCE + 1e-12 or self.low <= self.stated <= self.high


def wilson_interval(num_agreed: int, num_rows: int, z: float = Z_95) -> tuple[float, float]:
    p = num_agreed / num_rows
    denominator = 1 + z * z / num_rows
    centre = (p + z * z / (2 * num_rows)) / denominator
    half = z * math.sqrt(p * (1 - p) / num_rows + z * z / (4 * num_rows * num_rows)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _checks(table: AgreementTable, tally: dict[tuple[int, int], list[int]]) -> list[BinCheck]:
    """Per stated cell: the held-out rows counted in any of its bins (``tally``: (layer, bin) -> [rows,
    agreed])."""
    cells = table.cells()
    merged: dict[tuple[int, int], list[int]] = {}
    for (layer, b), (num_rows, num_agreed) in tally.items():
        cell = cells[layer - 1][b]
        counts = merged.setdefault((layer, cell.first), [0, 0])
        counts[0] += num_rows
        counts[1] += num_agreed
    checks = []
    for (layer, first), (num_rows, num_agreed) in sorted(merged.items()):
        if layer == len(cells) or num_rows == 0:  # the last layer is full depth itself
            continue
        cell = cells[layer - 1][first]
        low, high = wilson_interval(num_agreed, num_rows)
        checks.append(BinCheck(layer, cell.label, cell.stated, num_rows, num_agreed, low, high))
    return checks


def check_as_defined(table: AgreementTable, layer_logits: torch.Tensor) -> list[BinCheck]:
    """The held-out rows counted the way the table was (see the module docstring)."""
    confidence, agreed, counts = exit_candidates(layer_logits)
    tally: dict[tuple[int, int], list[int]] = {}
    for layer in range(layer_logits.shape[1]):
        for conf, agree, counted in zip(
            confidence[:, layer].tolist(), agreed[:, layer].tolist(), counts[:, layer].tolist(), strict=True
        ):
            if counted:
                cell = tally.setdefault((layer + 1, table.bin_index(conf)), [0, 0])
                cell[0] += 1
                cell[1] += int(agree)
    return _checks(table, tally)


def check_as_served(
    table: AgreementTable, layer_logits: torch.Tensor, criterion: Criterion, speeds: tuple[float, ...]
) -> list[BinCheck]:
    """The exits ``criterion`` makes at any of ``speeds`` on the held-out rows; a row that exits at the
    same layer and confidence at several speeds counts once (the same answer, not new evidence)."""
    probs = torch.softmax(layer_logits.float(), dim=-1)
    full = layer_logits[:, -1].argmax(dim=-1).tolist()
    seen: set[tuple[int, int]] = set()
    tally: dict[tuple[int, int], list[int]] = {}
    rows = torch.arange(layer_logits.shape[0])
    for speed in speeds:
        sim = simulate_exits(layer_logits, criterion, speed)
        confidence = probs[rows, sim.exit_layer - 1].max(dim=-1).values
        for row, (layer, conf, prediction) in enumerate(
            zip(sim.exit_layer.tolist(), confidence.tolist(), sim.predictions.tolist(), strict=True)
        ):
            if (row, layer) in seen:
                continue
            seen.add((row, layer))
            cell = tally.setdefault((layer, table.bin_index(conf)), [0, 0])
            cell[0] += 1
            cell[1] += int(prediction == full[row])
    return _checks(table, tally)


def format_checks(title: str, checks: list[BinCheck]) -> str:
    num_holding = sum(c.holds for c in checks)
    lines = [
        f"{title}: {num_holding} of {len(checks)} cells hold (within {100 * TOLERANCE:g} points, or inside "
        "the observed share's 95 % interval)",
        "",
        "| exit layer | confidence | rows | stated % | observed % | 95 % interval | holds |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        lines.append(
            f"| {c.layer} | {c.bin_label} | {c.num_rows} | {100 * c.stated:.1f} | {100 * c.observed:.1f} "
            f"| {100 * c.low:.1f}-{100 * c.high:.1f} | {'yes' if c.holds else '**no**'} |"
        )
    return "\n".join(lines)


def plot_reliability(series: dict[str, list[BinCheck]], path: Path, title: str) -> Path:
    """Stated vs observed agreement, one marker per bin (size by rows), with 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6), dpi=120)
    for (name, checks), marker in zip(series.items(), ("o", "s", "^"), strict=False):
        xs = [100 * c.stated for c in checks]
        ys = [100 * c.observed for c in checks]
        errors = [
            [max(0.0, 100 * (c.observed - c.low)) for c in checks],
            [max(0.0, 100 * (c.high - c.observed)) for c in checks],
        ]
        ax.errorbar(xs, ys, yerr=errors, fmt="none", alpha=0.3)
        ax.scatter(xs, ys, s=[8 + 2 * math.sqrt(c.num_rows) for c in checks], marker=marker, label=name)
    low = min([100 * min(c.low, c.stated) for checks in series.values() for c in checks] + [90.0])
    ax.plot([low, 100], [low, 100], color="black", linewidth=0.8, linestyle="--", label="stated = observed")
    ax.fill_between([low, 100], [low - 3, 97], [low + 3, 103], color="grey", alpha=0.15, label="± 3 points")
    ax.set_xlim(low, 100.5)
    ax.set_ylim(low, 100.5)
    ax.set_xlabel("stated agreement with full depth (%, dev split)")
    ax.set_ylabel("observed agreement with full depth (%, test split)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
