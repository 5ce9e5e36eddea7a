"""``loadtest.gpu_efficiency`` end to end on CPU with a narrow model (graphs replayed eagerly): the
pipeline the device machine runs, its exit mixes and its efficiency arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.gpu_efficiency import EXIT_MIXES, NUM_LAYERS, Options, draw_exit_layers, markdown, run

pytestmark = pytest.mark.model


def test_exit_mixes_have_the_means_the_issue_names() -> None:
    means = {}
    for name, mix in EXIT_MIXES.items():
        assert abs(sum(mix.values()) - 1.0) < 1e-9 and max(mix) == NUM_LAYERS
        layers = draw_exit_layers(mix, 20000, seed=0)
        means[name] = sum(layers) / len(layers)
    assert 1.8 <= means["easy"] <= 2.4
    assert 4.3 <= means["medium"] <= 5.0


def test_runs_on_cpu_and_reports_efficiency(tmp_path: Path) -> None:
    out = tmp_path / "gpu-efficiency.json"
    options = Options(
        dtypes=("float32",),
        modes=("eager", "graphs"),
        full_depth_batches=(1, 8),
        early_exit_batches=(8,),
        min_rows=96,
        full_depth_rows=16,
        out=out,
        device="cpu",
        hidden_size=32,
    )
    results = run(options)
    assert json.loads(out.read_text())["device"].startswith("cpu")
    eager, graphs = results["runs"]
    assert graphs["capture"]["num_graphs"] == NUM_LAYERS * 4  # rows 1, 2, 4, 8 at one token bucket
    assert eager["capture"] is None and "library_full_depth" in eager
    for run_doc in results["runs"]:
        assert set(run_doc["full_depth"]) == {1, 8} and run_doc["batch1_latency_ms"] > 0
        for key, ee in run_doc["early_exit"].items():
            mix = EXIT_MIXES[key.split("@")[0]]
            expected = sum(layer * share for layer, share in mix.items())
            assert abs(ee["mean_exit_layer"] - expected) < 1.0
            assert ee["ideal_rows_per_s"] > 0 and 0 < ee["efficiency"] < 3
    text = markdown(results)
    assert "| float32 | graphs | medium@8 |" in text and "efficiency" in text
