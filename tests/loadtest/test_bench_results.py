"""Choosing the speed, judging targets and rendering the report from hand-written run documents."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.bench import choose_speed
from loadtest.markdown import BEGIN, END, update_benchmarks_md
from loadtest.results import Target, sweep, targets


def _doc(rps: float, accuracy: float | None, mode: str = "closed", group: str = "refill") -> dict:
    return {
        "group": group,
        "settings": {"mode": mode, "concurrency": 64, "rate_per_s": None, "speeds": [0.0]},
        "results": {
            "throughput_rps": rps,
            "accuracy": accuracy,
            "num_ok": 100,
            "latency_ms": {"p50": 10.0, "p90": 20.0, "p99": 30.0},
            "errors_by_status": {},
            "exit_layer_histogram": {"1": 60, "6": 40},
            "mean_exit_layer": 3.0,
        },
    }


RUNS = {
    "refill-speed-0": _doc(100.0, 0.990),
    "refill-speed-0.1": _doc(250.0, 0.988),  # -0.2 pt: allowed
    "refill-speed-0.2": _doc(320.0, 0.9851),  # -0.49 pt: allowed, fastest allowed
    "refill-speed-0.5": _doc(500.0, 0.970),  # -2 pt: too inaccurate
    "shrink-speed-0": _doc(90.0, 0.990, group="shrink"),
    "shrink-speed-0.2": _doc(200.0, 0.9851, group="shrink"),
    "pipeline": _doc(40.0, 0.990, group="pipeline"),
    "tiny-1layer": _doc(2400.0, None, group="tiny"),
}
INDEX = {"chosen_speed": 0.2}


def test_choose_speed_takes_the_fastest_within_half_a_point() -> None:
    assert choose_speed(RUNS, [0.0, 0.1, 0.2, 0.5], "refill") == 0.2
    assert choose_speed(RUNS, [0.0, 0.1], "refill") == 0.1
    worse = {**RUNS, "refill-speed-0.1": _doc(250.0, 0.984)}  # -0.6 pt
    assert choose_speed(worse, [0.0, 0.1], "refill") == 0.0


def test_sweep_orders_by_speed_and_target() -> None:
    assert [s for s, _ in sweep(RUNS, "refill")] == [0.0, 0.1, 0.2, 0.5]
    assert [s for s, _ in sweep(RUNS, "shrink")] == [0.0, 0.2]


def test_targets_say_met_or_by_how_much_missed() -> None:
    found = {t.name: t for t in targets(INDEX, RUNS)}
    vs_full = found["refill speed 0.2 vs full depth (speed 0)"]
    assert vs_full.measured == pytest.approx(3.2)
    assert vs_full.verdict() == "met"
    vs_pipeline = found["refill speed 0.2 vs pipeline baseline"]
    assert vs_pipeline.measured == pytest.approx(8.0)
    assert vs_pipeline.met
    tiny = found["1-layer tiny model, closed loop"]
    assert tiny.verdict() == "missed by 600 req/s (80% of target)"
    assert Target("x", 2.0, None, "x").verdict() == "not measured"


def test_report_block_is_replaced_and_the_rest_kept(tmp_path: Path) -> None:
    index = {
        **INDEX,
        "finished_at": "2026-01-01T00:00:00+00:00",
        "elapsed_s": 600.0,
        "machine_before": {
            "cpu": "CPU",
            "num_cpus": 2,
            "os": "Linux",
            "python": "3.11",
            "load_average_1_5_15": [0.1, 0.2, 0.3],
        },
        "machine_after": {"load_average_1_5_15": [1.0, 1.0, 1.0]},
        "commit": {"sha": "abc123", "dirty": False},
        "options": {
            "model": "m",
            "store": "store",
            "concurrency": 64,
            "closed_max_duration_s": 45.0,
            "open_duration_s": 20.0,
            "num_warmup_requests": 16,
        },
        "dataset": {"num_examples": 100, "source": "test split", "seed": 0},
        "common_rate_per_s": 28.0,
    }
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# Benchmarks\n\nintro by hand\n\n{BEGIN}\nold numbers\n{END}\n\n## Analysis\nby hand\n")
    update_benchmarks_md(index, RUNS, path)
    text = path.read_text()
    assert "old numbers" not in text
    assert text.startswith("# Benchmarks\n\nintro by hand\n")
    assert text.endswith("## Analysis\nby hand\n")
    assert "`abc123`" in text
    assert "| refill-speed-0.2 | closed, 64 in flight | 0 | 100 | 320.0 |" in text
    assert "| 0.2 | 320.0 | 200.0 | 1.60 |" in text  # refill vs shrink at the same speed
    assert "missed by 600 req/s" in text
