"""The manifest of a model version: what the server needs to know before it reads any weights."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from model_store.policy import Criterion

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION: Literal[1] = 1


class RampSpec(BaseModel):
    """How the off-ramps are built (see ``early_exit.OffRamp``)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["mean_pool_mlp"] = "mean_pool_mlp"
    hidden_size: int = Field(gt=0)
    final: Literal["mean_pool_mlp", "checkpoint_head"] = Field(
        default="mean_pool_mlp",
        description="the exit after the last layer: a ramp like the others, or an adopted checkpoint's own "
        "classification head (model_store.heads)",
    )


class CalibrationPoint(BaseModel):
    """Measured behaviour of one (criterion, speed) setting on a held-out split."""

    model_config = ConfigDict(extra="forbid")
    criterion: Criterion
    speed: float = Field(ge=0.0, le=1.0)
    accuracy: float = Field(ge=0.0, le=1.0)
    mean_exit_layer: float = Field(ge=1.0)
    layers_saved: float = Field(ge=0.0, le=1.0, description="1 - mean_exit_layer / num_layers")
    expected_speedup: float = Field(gt=0.0, description="num_layers / mean_exit_layer")
    accuracy_drop: float | None = Field(
        default=None, description="full-depth accuracy minus this accuracy (positive = worse)"
    )
    accuracy_drop_upper: float | None = Field(
        default=None,
        description="one-sided 95 % upper confidence bound of accuracy_drop (paired: rows where the "
        "early answer and the full-depth answer differ in correctness); targets are resolved on it",
    )
    early_exit_agreement: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="among rows that left before the last layer, the share whose answer equals full "
        "depth's (what the live accuracy guard measures; none when no row left early)",
    )


CONFIDENCE_EDGES = (0.0, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
MIN_CELL_ROWS = 40  # adjacent confidence bins of a layer are merged until each cell counts this many rows


@dataclass(frozen=True)
class TrustCell:
    """Adjacent confidence bins ``first..last`` of one layer, merged: the figure is stated per cell."""

    layer: int
    first: int
    last: int
    num_rows: int
    num_agreed: int
    stated: float
    label: str  # "0.9-0.99": the confidence range


class AgreementTable(BaseModel):
    """The trust figure: how often an answer from ramp ``layer`` with confidence (its top probability)
    in a range equals the full-depth answer, counted on the calibration split.

    A row counts at a layer when its confidence there is at least that of every earlier ramp: only then
    can a confidence-threshold policy exit there (the rows such policies do exit there are a subset), so
    easy rows, which every policy lets go earlier, do not inflate a deeper layer's figure. Each row counts
    at most once per layer. Counts are kept per fine bin (``confidence_edges``); the figure is stated per
    *cell*, adjacent bins of a layer merged until each holds ``MIN_CELL_ROWS`` rows (a bin of 20 rows
    states its share to within +-10 points at best), as (agreed + 0.5) / (rows + 1). The last layer's
    answers are full depth's: 1.
    """

    model_config = ConfigDict(extra="forbid")
    confidence_edges: list[float] = Field(
        default_factory=lambda: list(CONFIDENCE_EDGES),
        description="bin b holds confidences in [edges[b], edges[b+1]); the last bin includes 1.0",
    )
    num_rows: list[list[int]] = Field(description="[layer - 1][bin]: rows counted")
    num_agreed: list[list[int]] = Field(description="[layer - 1][bin]: of those, equal to full depth")
    min_cell_rows: int = Field(default=MIN_CELL_ROWS, ge=1)
    _cells: list[list[TrustCell]] | None = PrivateAttr(default=None)

    def bin_index(self, confidence: float) -> int:
        edges = self.confidence_edges
        return max(0, min(len(edges) - 2, bisect.bisect_right(edges, confidence) - 1))

    def cells(self) -> list[list[TrustCell]]:
        """[layer - 1][bin]: the cell each fine bin belongs to (see the class docstring)."""
        if self._cells is None:
            self._cells = [self._layer_cells(layer) for layer in range(1, len(self.num_rows) + 1)]
        return self._cells

    def _layer_cells(self, layer: int) -> list[TrustCell]:
        rows, agreed = self.num_rows[layer - 1], self.num_agreed[layer - 1]
        groups: list[list[int]] = []
        for b in range(len(rows)):
            if groups and sum(rows[i] for i in groups[-1]) < self.min_cell_rows:
                groups[-1].append(b)
            else:
                groups.append([b])
        if len(groups) > 1 and sum(rows[i] for i in groups[-1]) < self.min_cell_rows:
            groups[-2].extend(groups.pop())  # the top cell is short: merged into the one below
        last_layer = layer == len(self.num_rows)
        by_bin: list[TrustCell] = []
        edges = self.confidence_edges
        for group in groups:
            n, a = sum(rows[i] for i in group), sum(agreed[i] for i in group)
            cell = TrustCell(
                layer=layer,
                first=group[0],
                last=group[-1],
                num_rows=n,
                num_agreed=a,
                stated=1.0 if last_layer else (a + 0.5) / (n + 1),
                label=f"{edges[group[0]]:g}-{edges[group[-1] + 1]:g}",
            )
            by_bin += [cell] * len(group)
        return by_bin

    def cell(self, exit_layer: int, confidence: float) -> TrustCell:
        cells = self.cells()
        return cells[max(1, min(len(cells), exit_layer)) - 1][self.bin_index(confidence)]

    def agreement(self, exit_layer: int, confidence: float) -> float:
        """The stated probability that an answer from ``exit_layer`` at ``confidence`` is full depth's."""
        return round(self.cell(exit_layer, confidence).stated, 4)


class CalibrationTable(BaseModel):
    """Speed-accuracy sweep measured after training; filled in by the calibration step."""

    model_config = ConfigDict(extra="forbid")
    split: str
    num_examples: int = Field(ge=0)
    full_depth_accuracy: float = Field(ge=0.0, le=1.0)
    per_layer_accuracy: list[float] = Field(default_factory=list, description="ramp k at index k-1")
    points: list[CalibrationPoint] = Field(default_factory=list)
    agreement_table: AgreementTable | None = Field(
        default=None, description="trust figure per (exit layer, confidence bin); none in older versions"
    )


def conservative_drop(table: CalibrationTable, point: CalibrationPoint) -> float:
    """A point's accuracy drop as a fraction: its upper confidence bound when known, else the estimate."""
    if point.accuracy_drop_upper is not None:
        return point.accuracy_drop_upper
    return table.full_depth_accuracy - point.accuracy


class Provenance(BaseModel):
    """Where a model version came from."""

    model_config = ConfigDict(extra="allow")
    recipe: str | None = None
    base_model: str | None = None
    data: str | None = None
    seed: int | None = None
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


class Manifest(BaseModel):
    """``manifest.json`` of ``<store>/<model>/<version>/``."""

    model_config = ConfigDict(extra="forbid")
    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    architecture: str = Field(description="the encoder's config.model_type, e.g. bert, roberta, mpnet")
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    labels: list[str] = Field(min_length=2)
    max_seq_length: int = Field(gt=0)
    input_kind: Literal["text", "pair"] = Field(
        default="text",
        description="text: one text per input; pair: two (premise/hypothesis, query/passage), tokenized "
        "as the tokenizer joins pairs, truncated longest-first to max_seq_length",
    )
    pair_separator_id: int | None = Field(
        default=None,
        description="pair models: the separator token; tokens after its first occurrence are segment B "
        "(token type 1) for encoders with token types",
    )
    ramp: RampSpec
    default_criterion: Criterion = Criterion.NORMALIZED_ENTROPY
    default_speed: float = Field(default=0.0, ge=0.0, le=1.0)
    calibration: CalibrationTable | None = None
    quantization: Literal["none", "int8_dynamic"] = Field(
        default="none",
        description="int8_dynamic: the encoder's Linear layers are served as dynamic int8 (CPU), derived "
        "at load from the float32 weights stored here; the calibration was measured on them",
    )
    int8_weights: Literal["per_tensor", "per_channel"] = Field(
        default="per_tensor",
        description="int8_dynamic: weight scales per tensor or per output channel",
    )
    int8_engine: str | None = Field(
        default=None,
        description="int8_dynamic: the quantized engine (fbgemm, onednn, x86) whose kernels the calibration "
        "and test evaluation ran on; a server packs for it when its torch has it (None: chosen at load)",
    )
    provenance: Provenance = Field(default_factory=Provenance)
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256 hex digest")

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: list[str]) -> list[str]:
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be unique")
        return labels

    def summary(self) -> dict[str, Any]:
        """A short description for listings."""
        return {
            "name": self.name,
            "version": self.version,
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "labels": self.labels,
            "recipe": self.provenance.recipe,
            "created_at": self.provenance.created_at,
        }
