"""Bounded runs against the fake server: request count, time, accuracy, statuses, speed mix, JSON."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from loadtest.__main__ import main
from loadtest.dataset import DatasetError, Example, load_jsonl
from loadtest.generator import LoadSettings, run_load

# the fake server labels "spam" iff the text holds "spam"; exit layer 1 + words mod 3
EXAMPLES = [
    Example("buy spam now", "spam"),  # right, 3 words -> layer 1
    Example("hello there", "ham"),  # right, 2 words -> layer 3
    Example("cheap pills", "spam"),  # wrong, 2 words -> layer 3
    Example("spam", "ham"),  # wrong, 1 word -> layer 2
]


async def test_closed_loop_stops_at_max_requests(server) -> None:
    settings = LoadSettings(url=server.url, concurrency=4, max_requests=25, max_duration_s=30.0)
    result = await run_load(settings, EXAMPLES)
    assert len(result.records) == 25
    assert len(server.bodies) == 25  # not one more
    assert [r.index for r in result.records] == list(range(25))
    assert [r.example_index for r in result.records] == [i % 4 for i in range(25)]
    assert result.summary["num_ok"] == 25


async def test_accuracy_and_exit_layers_through_the_server(server) -> None:
    settings = LoadSettings(url=server.url, concurrency=3, max_requests=8, max_duration_s=30.0)
    result = await run_load(settings, EXAMPLES)  # each example twice
    summary = result.summary
    assert (summary["num_correct"], summary["num_scored"]) == (4, 8)
    assert summary["accuracy"] == 0.5
    assert summary["exit_layer_histogram"] == {"1": 2, "2": 2, "3": 4}
    assert summary["mean_exit_layer"] == 2.25


async def test_errors_counted_by_status(server) -> None:
    examples = [Example("status:503 busy", "ham"), Example("status:429 full", "ham"), Example("spam", "spam")]
    settings = LoadSettings(url=server.url, concurrency=2, max_requests=9, max_duration_s=30.0)
    summary = (await run_load(settings, examples)).summary
    assert summary["errors_by_status"] == {"429": 3, "503": 3}
    assert summary["status_counts"] == {"200": 3, "429": 3, "503": 3}
    assert summary["num_scored"] == 3  # failed requests are not scored
    assert summary["accuracy"] == 1.0


async def test_connection_refused_is_an_error_not_a_crash() -> None:
    from loadtest.servers import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = LoadSettings(url=url, concurrency=2, max_requests=4, max_duration_s=5.0)
    summary = (await run_load(settings, EXAMPLES)).summary
    assert summary["errors_by_status"] == {"transport:ConnectError": 4}
    assert summary["throughput_rps"] == 0.0


@pytest.mark.serial
async def test_closed_loop_stops_at_max_duration(server) -> None:
    examples = [Example("sleep:0.05 spam", "spam")]
    settings = LoadSettings(url=server.url, concurrency=2, max_requests=100_000, max_duration_s=0.5)
    started = time.perf_counter()
    result = await run_load(settings, examples)
    elapsed_s = time.perf_counter() - started
    assert elapsed_s < 0.5 + 0.5  # one in-flight request per worker may finish after the bound
    # 2 workers x 0.5 s / 0.05 s per request = 20 at most (+ the ones in flight at the bound)
    assert 4 <= len(result.records) <= 22
    assert all(r.sent_s < 0.5 for r in result.records)


@pytest.mark.serial
async def test_drain_timeout_cancels_stragglers(server) -> None:
    examples = [Example("sleep:3 spam", "spam")]
    settings = LoadSettings(
        url=server.url, concurrency=3, max_requests=100, max_duration_s=0.2, drain_timeout_s=0.2
    )
    started = time.perf_counter()
    result = await run_load(settings, examples)
    assert time.perf_counter() - started < 1.5
    assert result.summary["errors_by_status"] == {"cancelled": 3}


@pytest.mark.serial
async def test_open_loop_follows_the_poisson_schedule(server) -> None:
    settings = LoadSettings(
        url=server.url, mode="open", rate_per_s=200.0, concurrency=64, max_requests=10_000, max_duration_s=1.0
    )
    result = await run_load(settings, EXAMPLES)
    num = len(result.records)
    assert 200 - 4 * 200**0.5 <= num <= 200 + 4 * 200**0.5  # Poisson count over 1 s: mean 200, sd 14
    assert all(r.scheduled_s < 1.0 for r in result.records)
    assert result.summary["num_ok"] == num
    # the same seed gives the same schedule
    again = await run_load(settings, EXAMPLES)
    assert [r.scheduled_s for r in again.records][:50] == pytest.approx(
        [r.scheduled_s for r in result.records][:50], abs=1e-9
    )


async def test_open_loop_stops_at_max_requests(server) -> None:
    settings = LoadSettings(
        url=server.url, mode="open", rate_per_s=500.0, concurrency=16, max_requests=30, max_duration_s=10.0
    )
    result = await run_load(settings, EXAMPLES)
    assert len(result.records) == 30
    assert len(server.bodies) == 30
    assert result.duration_s < 1.0  # 30 arrivals at 500/s take ~60 ms, not the 10 s bound


async def test_speed_mix_is_sent_and_reported_per_speed(server) -> None:
    settings = LoadSettings(
        url=server.url, concurrency=4, max_requests=200, max_duration_s=30.0, speeds=(0.0, 0.5), seed=5
    )
    result = await run_load(settings, EXAMPLES)
    sent = Counter(body["speed"] for body in server.bodies)
    assert set(sent) == {0.0, 0.5}
    assert 60 <= sent[0.5] <= 140  # seeded coin flips
    assert Counter(r.speed for r in result.records) == sent
    per_speed = result.summary["per_speed"]
    assert per_speed["0"]["num_requests"] == sent[0.0]
    assert per_speed["0.5"]["num_requests"] == sent[0.5]
    # default speed: no "speed" field in the body at all
    server.bodies.clear()
    await run_load(LoadSettings(url=server.url, max_requests=3, concurrency=1), EXAMPLES)
    assert all("speed" not in body for body in server.bodies)


def test_invalid_settings_refused(server) -> None:
    with pytest.raises(ValueError):
        LoadSettings(url=server.url, mode="open")  # no rate
    with pytest.raises(ValueError):
        LoadSettings(url=server.url, speeds=(1.5,))
    with pytest.raises(ValueError):
        LoadSettings(url=server.url, max_requests=0)


def test_cli_run_writes_one_json_per_run(server, tmp_path: Path) -> None:
    dataset = tmp_path / "inputs.jsonl"
    dataset.write_text("\n".join(json.dumps({"text": e.text, "label": e.label}) for e in EXAMPLES) + "\n")
    out = tmp_path / "run.json"
    argv = ["run", "--url", server.url, "--dataset", str(dataset), "--max-requests", "12"]
    argv += ["--concurrency", "2", "--speeds", "0,0.3", "--warmup", "2", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    document = json.loads(out.read_text())
    assert document["settings"]["speeds"] == [0.0, 0.3]
    assert document["settings"]["max_requests"] == 12
    assert document["dataset"]["num_examples"] == 4
    assert document["machine"]["num_cpus"] >= 1
    assert "sha" in document["commit"]
    results = document["results"]
    assert results["num_requests"] == 12
    assert results["accuracy"] == 0.5
    assert set(results["latency_ms"]) >= {"p50", "p90", "p99"}
    assert len(server.bodies) == 12 + 2  # 2 warm-up requests, not recorded


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "ham"}\n\n{"label": "spam"}\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl:3"):
        load_jsonl(bad)
    unlabelled = tmp_path / "u.jsonl"
    unlabelled.write_text('{"text": "a"}\n')
    assert load_jsonl(unlabelled) == [Example("a", None)]
