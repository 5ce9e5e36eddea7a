"""loadtest/beyond.py: the figures of a phase from known answers, and the BENCHMARKS.md block."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.beyond import BEGIN, END, Answer, Phase, markdown_tables, summarize, update_markdown

LABELS = ["spam", "ham", "spam", "ham"]
REFERENCE = {0: "spam", 1: "ham", 2: "ham", 3: "ham"}  # full depth is wrong on row 2


def _phase() -> Phase:
    phase = Phase("degrade policy", offered_rps=4.0, deadline_ms=1000)
    phase.answers = [
        Answer(0, 0.0, 0.2, "200", "spam", 6),
        Answer(1, 0.1, 0.5, "200", "spam", 1, degraded=True),  # wrong, and unlike full depth
        Answer(2, 0.2, 0.6, "200", "spam", 2, degraded=True),  # right where full depth was wrong
        Answer(3, 0.3, 1.5, "200", "ham", 6),  # late: not goodput
        Answer(0, 0.4, 0.41, "429"),
    ]
    phase.recovery = [Answer(1, 0.1, 0.2, "200", "ham", 6), Answer(2, 0.6, 0.7, "200", "ham", 6)]
    return phase


def test_summary_counts_goodput_accuracy_and_agreement_against_full_depth() -> None:
    s = summarize(_phase(), duration_s=1.0, reference=REFERENCE, labels=LABELS)
    assert s["goodput_rps"] == 3.0 and s["num_429"] == 1 and s["ok_late"] == 1
    assert s["answered_in_time"] == pytest.approx(3 / 5, abs=1e-4)
    assert s["accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["full_depth_accuracy_same_rows"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["agreement_with_full_depth"] == pytest.approx(1 / 3, abs=1e-4)
    assert (s["num_better_than_full_depth"], s["num_worse_than_full_depth"]) == (1, 1)
    assert s["degraded_share"] == pytest.approx(2 / 3, abs=1e-4) and s["mean_exit_layer"] == pytest.approx(
        3.0
    )
    assert s["recovery"]["back_to_normal_s"] == 0.0


def test_markdown_block_is_replaced_between_its_markers(tmp_path: Path) -> None:
    summary = summarize(_phase(), 1.0, REFERENCE, LABELS)
    document = {
        "machine": {"cpu": "cpu", "num_cpus": 2, "memory_gib": 8, "torch": "2", "load_average_1_5_15": [0.5]},
        "commit": {"sha": "abcdef0123", "dirty": False},
        "started_at": "2026-12-02T00:00:00Z",
        "options": {"miss_quantile": 30.0},
        "capacity": {"rps": 2.0},
        "reference": {"num_texts": 4, "full_depth_accuracy": 0.75},
        "degrade": [summary],
        "anytime": {"deadline_ms": 100, "steady_rps": 1.8, "phases": [summary]},
    }
    table = markdown_tables(document)
    assert "| degrade policy | 4.0 | **3.0** | 1 |" in table and "abcdef0" in table
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nhand-written\n")
    update_markdown(document, path)
    update_markdown(document, path)
    text = path.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and text.startswith("# Benchmarks\n\nhand-written")
