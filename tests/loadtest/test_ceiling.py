"""The ceiling's rounds: each figure is the median over rounds, each ratio taken within its round."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loadtest.ceiling import markdown, median_rows
from loadtest.core_vs_http import CoreAlone, summarize
from loadtest.tiny import make_tiny_store


def _row(server: str, text: str, round_: int, rps: float, cpu_ms: float, vs: float, cpu_vs: float) -> dict:
    return {
        "server": server, "text": text, "frontends": 1, "round": round_, "ok_rps": rps, "vs_hello": vs,
        "server_cpu_ms_per_request": cpu_ms, "cpu_vs_hello": cpu_vs, "p50_ms": 1.0 * round_,
        "p99_ms": 2.0 * round_, "non_2xx": round_ - 1, "requests": 100,
    }  # fmt: skip


def test_medians_over_rounds_with_ratios_from_within_each_round() -> None:
    raw = [
        _row("hello", "short", 1, 5000.0, 0.20, 1.0, 1.0),
        _row("tiny", "short", 1, 2000.0, 0.40, 0.40, 2.0),
        _row("hello", "short", 2, 3000.0, 0.30, 1.0, 1.0),  # a neighbour slowed this round
        _row("tiny", "short", 2, 1500.0, 0.60, 0.50, 2.0),
        _row("hello", "short", 3, 4000.0, 0.25, 1.0, 1.0),
        _row("tiny", "short", 3, 1800.0, 0.45, 0.45, 1.8),
    ]
    hello, tiny = median_rows(raw)
    assert (hello["server"], hello["ok_rps"], hello["server_cpu_ms_per_request"]) == ("hello", 4000.0, 0.25)
    assert tiny["ok_rps"] == 1800.0 and tiny["vs_hello"] == 0.45 and tiny["cpu_vs_hello"] == 2.0
    assert (tiny["cpu_min_ms"], tiny["cpu_max_ms"], tiny["server_cpu_ms_per_request"]) == (0.40, 0.60, 0.45)
    assert tiny["rounds"] == 3 and tiny["non_2xx"] == 3 and tiny["requests"] == 300
    assert (tiny["p50_ms"], tiny["p99_ms"]) == (2.0, 4.0)


def test_the_table_shows_the_medians_and_the_cpu_range() -> None:
    machine = {"cpu": "x", "num_cpus": 2, "memory_gib": 1, "os": "l", "python": "3", "torch": "t",
               "load_average_1_5_15": [0.0, 0.0, 0.0]}  # fmt: skip
    rows = median_rows([_row("tiny", "short", r, 1000.0 * r, 0.1 * r, 0.5, 2.0) for r in (1, 2, 3)])
    text = markdown(
        {
            "started": "now",
            "commit": {"sha": "abc"},
            "machine": machine,
            "machine_after": machine,
            "settings": {"wrk": "1 thread", "rounds": 3},
            "ceiling": rows,
            "host_step_us": {"64": 90.0},
            "carried_step_us": {"64": 80.0},
            "floor_step_us": {"64": 50.4},
            "cached_host_step_us": {"64": 70.2},
            "cached_carried_step_us": {"64": 40.0},
            "tokenizer_us": {
                "150 chars": {"library_us": 53.4, "fast_us": 8.31, "fast_again_us": 8.0, "num_texts": 2000}
            },
        }
    )
    assert "median of 3 rounds" in text
    assert "| tiny | short | 1 | 2,000 | 50 % | 0.200 (0.100–0.300) | 2.00 x |" in text
    assert "| 64 | 90 | 80 | 70 | 40 | 50 |" in text
    assert "| 150 chars | 2,000 | 53.4 | 8.3 | 8.0 |" in text


def _core_round(core_rps: float, http_rps: float, non_2xx: int = 0) -> dict:
    return {
        "core_rps": core_rps, "core_failed": 0, "http_rps": http_rps, "http_non_2xx": non_2xx,
        "http_p99_ms": 100.0, "http_cpu_ms_per_request": 4.0, "ratio": http_rps / core_rps,
    }  # fmt: skip


def test_http_vs_core_is_the_median_of_ratios_taken_within_each_round() -> None:
    rounds = [
        _core_round(300.0, 270.0),  # 90 %
        _core_round(200.0, 160.0, non_2xx=2),  # 80 %: a neighbour slowed both sides of this round
        _core_round(250.0, 210.0),  # 84 %
    ]
    summary = summarize(rounds)
    # Medians of each side apart (250 and 210) would say 84 % too; the ratio is still the rounds' own.
    assert summary["ratio"] == rounds[2]["ratio"]
    assert (summary["ratio_min"], summary["ratio_max"]) == (0.8, 0.9)
    assert (summary["core_rps"], summary["http_rps"], summary["http_non_2xx"]) == (250.0, 210.0, 2)
    assert summary["core_failed"] == 0
    machine = {"cpu": "x", "num_cpus": 2, "memory_gib": 1, "os": "l", "python": "3", "torch": "t",
               "load_average_1_5_15": [0.0, 0.0, 0.0]}  # fmt: skip
    core = summary | {"model": "m", "speed": 0.3, "num_emails": 600, "connections": 64, "frontends": 1}
    text = markdown(
        {
            "started": "now", "commit": {"sha": "abc"}, "machine": machine, "machine_after": machine,
            "settings": {"wrk": "1 thread", "rounds": 3}, "ceiling": [], "host_step_us": {},
            "core_vs_http": core,
        }
    )  # fmt: skip
    assert (
        "3 round(s)" in text and "**84 %** of the core's own throughput (rounds: 90 %, 80 %, 84 %)." in text
    )


@pytest.mark.model
def test_the_core_alone_answers_every_email_once_and_reports_to_the_servers_metrics(tmp_path: Path) -> None:
    make_tiny_store(tmp_path / "store", max_seq_length=32)
    emails = [f"email number {i} about a free cruise" for i in range(40)]
    options = SimpleNamespace(store=tmp_path / "store", model="tiny-1layer", connections=8)
    result = CoreAlone(options, emails).run()
    assert torch.is_grad_enabled()  # the caller's grad mode is left alone
    assert result["failed"] == 0 and result["rps"] > 0
    assert result["rows_counted"] == len(emails)  # every answer went through the metrics, once
