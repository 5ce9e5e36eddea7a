"""The manifest of a model version: what the server needs to know before it reads any weights."""

from __future__ import annotations

import bisect
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


class AgreementTable(BaseModel):
    """The trust figure: how often an answer from ramp ``layer`` with confidence (its top probability)
    in a bin equals the full-depth answer, counted on the calibration split.

    A row counts at a layer when its confidence there is at least that of every earlier ramp: only then
    can a confidence-threshold policy exit there, so easy rows, which every policy lets go earlier, do
    not inflate a deeper layer's figure. Each row counts at most once per layer.
    """

    model_config = ConfigDict(extra="forbid")
    confidence_edges: list[float] = Field(
        default_factory=lambda: list(CONFIDENCE_EDGES),
        description="bin b holds confidences in [edges[b], edges[b+1]); the last bin includes 1.0",
    )
    num_rows: list[list[int]] = Field(description="[layer - 1][bin]: rows counted")
    num_agreed: list[list[int]] = Field(description="[layer - 1][bin]: of those, equal to full depth")
    _estimates: list[list[float]] | None = PrivateAttr(default=None)

    def bin_index(self, confidence: float) -> int:
        edges = self.confidence_edges
        return max(0, min(len(edges) - 2, bisect.bisect_right(edges, confidence) - 1))

    def bin_label(self, index: int) -> str:
        return f"{self.confidence_edges[index]:g}-{self.confidence_edges[index + 1]:g}"

    def estimates(self) -> list[list[float]]:
        """[layer - 1][bin]: the stated figure, (agreed + 0.5) / (rows + 1) (a bin's few rows do not
        claim certainty); a bin with no rows states its layer's figure; the last layer states 1."""
        if self._estimates is None:
            table: list[list[float]] = []
            num_layers = len(self.num_rows)
            for layer, (rows, agreed) in enumerate(zip(self.num_rows, self.num_agreed, strict=True), 1):
                pooled = (sum(agreed) + 0.5) / (sum(rows) + 1)
                table.append(
                    [
                        1.0 if layer == num_layers else (a + 0.5) / (n + 1) if n else pooled
                        for n, a in zip(rows, agreed, strict=True)
                    ]
                )
            self._estimates = table
        return self._estimates

    def agreement(self, exit_layer: int, confidence: float) -> float:
        """The stated probability that an answer from ``exit_layer`` at ``confidence`` is full depth's."""
        estimates = self.estimates()
        layer = max(1, min(len(estimates), exit_layer))
        return round(estimates[layer - 1][self.bin_index(confidence)], 4)


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
    ramp: RampSpec
    default_criterion: Criterion = Criterion.NORMALIZED_ENTROPY
    default_speed: float = Field(default=0.0, ge=0.0, le=1.0)
    calibration: CalibrationTable | None = None
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
