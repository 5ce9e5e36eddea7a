"""What the API tells about the served model, from its manifest alone (no torch: front ends use it)."""

from __future__ import annotations

from model_store.manifest import Manifest
from server.engine.guard import speed_bucket
from server.engine.types import ModelInfo


def expected_agreement(manifest: Manifest) -> dict[str, float]:
    """Calibrated agreement of early exits with full depth, per speed bucket, for the default criterion."""
    calibration = manifest.calibration
    if calibration is None:
        return {}
    expected: dict[str, float] = {}
    for point in calibration.points:
        agreement = getattr(point, "early_exit_agreement", None)
        if point.criterion == manifest.default_criterion and agreement is not None:
            expected.setdefault(speed_bucket(point.speed), float(agreement))
    return expected


def static_model_info(manifest: Manifest, sample_fraction: float) -> ModelInfo:
    """What ``GET /v1/models`` says before the core reports live figures (tables dumped once)."""
    m = manifest
    return ModelInfo(
        name=m.name,
        version=m.version,
        architecture=m.architecture,
        num_layers=m.num_layers,
        labels=list(m.labels),
        max_seq_length=m.max_seq_length,
        default_criterion=m.default_criterion,
        default_speed=m.default_speed,
        calibration=m.calibration.model_dump(mode="json") if m.calibration else None,
        calibration_table=m.calibration,
        provenance=m.provenance.model_dump(mode="json"),
        input_kind=m.input_kind,
        live_guard={
            "sample_fraction": sample_fraction,
            "expected_agreement": expected_agreement(m),
            "num_dropped": 0,
            "buckets": {},
            "auto_adjust": None,
        },
    )
