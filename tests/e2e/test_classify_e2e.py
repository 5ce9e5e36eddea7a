"""Real HTTP against a real uvicorn process: answers equal the model core's, metrics count what happened."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import time

import httpx

from model_store.criteria import Criterion
from model_store.reference import RowPolicies, early_exit_forward
from model_store.store import ModelStore
from model_store.text import encode_texts
from tests.e2e.conftest import ServerProcess, start_server
from tests.tiny_models import save_tiny_store

WORDS = ["free", "money", "offer", "meeting", "agenda", "click", "now", "winner", "lunch", "invoice", "team"]
SPEEDS = [0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0]


def _jobs(num: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    jobs = []
    for _ in range(num):
        texts = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(rng.randint(1, 3))
        ]
        job: dict[str, object] = {"inputs": texts, "speed": rng.choice(SPEEDS), "return_probs": True}
        if rng.random() < 0.7:
            job["criterion"] = rng.choice([c.value for c in Criterion])
        jobs.append(job)
    return jobs


def _exit_layer_buckets(metrics_text: str) -> dict[str, float]:
    pattern = re.compile(r'^exitserve_exit_layer_bucket\{[^}]*le="([^"]+)"[^}]*\} ([0-9.e+]+)$', re.M)
    return {le: float(value) for le, value in pattern.findall(metrics_text)}


async def _send_all(base_url: str, jobs: list[dict[str, object]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        return await asyncio.gather(*(client.post("/v1/classify", json=job) for job in jobs))


def test_concurrent_requests_get_the_model_cores_answers(
    server: ServerProcess, tiny_store: ModelStore
) -> None:
    before = _exit_layer_buckets(httpx.get(f"{server.base_url}/metrics").text)
    jobs = _jobs(60, seed=3)
    responses = asyncio.run(_send_all(server.base_url, jobs))
    loaded = tiny_store.load("tiny")
    exit_layers: list[int] = []
    for job, response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        criterion = Criterion(job.get("criterion", loaded.manifest.default_criterion))
        assert body["speed"] == job["speed"] and body["criterion"] == criterion.value
        assert float(response.headers["X-Queue-Time-Ms"]) >= 0
        texts = job["inputs"]
        assert isinstance(texts, list)
        for text, result in zip(texts, body["results"], strict=True):
            batch = encode_texts(loaded.tokenizer, [text], loaded.manifest.max_seq_length)
            policies = RowPolicies.from_rows([criterion], [float(job["speed"])], [None], 3, 4)  # type: ignore[arg-type]
            alone = early_exit_forward(loaded.model, batch.input_ids, batch.attention_mask, policies)[0]
            assert result["exit_layer"] == alone.exit_layer, (text, job)
            assert result["num_layers_run"] == alone.num_layers_run
            assert result["label"] == loaded.manifest.labels[alone.label_index]
            probs = [result["probs"][label] for label in loaded.manifest.labels]
            assert max(abs(a - b) for a, b in zip(probs, alone.probs, strict=True)) <= 1e-5
            exit_layers.append(result["exit_layer"])
    assert len(set(exit_layers)) >= 3

    after = _exit_layer_buckets(httpx.get(f"{server.base_url}/metrics").text)
    for layer in range(1, 5):
        le = f"{float(layer)}"
        counted = after[le] - before.get(le, 0.0)
        assert counted == sum(1 for x in exit_layers if x <= layer), f"le={le}"
    assert after["+Inf"] - before.get("+Inf", 0.0) == len(exit_layers)


def test_sigterm_finishes_in_flight_work_and_exits_zero(
    tiny_store: ModelStore, tmp_path, frontends: int
) -> None:
    # This test is about the drain, not admission: 120 rows at 2 per step can exceed the default
    # 500 ms queue-wait bound on a slow machine, and a 429 would hide what it checks.
    running = start_server(
        tiny_store.root,
        tmp_path / "server.log",
        "--max-batch-size", "2", "--max-queue-wait-ms", "none",
        frontends=frontends,
    )  # fmt: skip
    jobs = [{"inputs": ["word " * 30] * 4, "speed": 0.0} for _ in range(30)]

    async def scenario() -> tuple[list[httpx.Response | BaseException], int]:
        async with httpx.AsyncClient(base_url=running.base_url, timeout=60) as client:
            tasks = [asyncio.create_task(client.post("/v1/classify", json=job)) for job in jobs]
            await asyncio.sleep(0.3)  # requests are in flight
            running.process.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            code = await asyncio.to_thread(running.wait, 60)
            return results, code

    started = time.monotonic()
    results, code = asyncio.run(scenario())
    assert code == 0, running.log()
    statuses = [r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in results]
    # Every request that reached the server before SIGTERM was answered in full; none was cut off.
    assert all(s == 200 for s in statuses), statuses
    assert time.monotonic() - started < 60
    try:
        httpx.get(f"{running.base_url}/healthz", timeout=2)
        raise AssertionError("server still accepting after exit")
    except httpx.TransportError:
        pass


def test_drain_overrun_answers_leftovers_with_json_503_and_exits_zero(tmp_path, frontends: int) -> None:
    # A compute-bound model and big requests: at SIGTERM + 1 s (the drain timeout) most are unfinished.
    save_tiny_store(tmp_path / "store", num_layers=6, hidden_size=256, max_seq_length=128)
    running = start_server(
        tmp_path / "store", tmp_path / "server.log",
        "--drain-timeout-s", "1", "--max-batch-size", "4", "--max-queue-wait-ms", "none",
        frontends=frontends,
    )  # fmt: skip
    jobs = [{"inputs": ["word " * 120] * 32, "speed": 0.0} for _ in range(8)]

    async def scenario() -> tuple[list[httpx.Response | BaseException], int, float]:
        async with httpx.AsyncClient(base_url=running.base_url, timeout=60) as client:
            tasks = [asyncio.create_task(client.post("/v1/classify", json=job)) for job in jobs]
            await asyncio.sleep(0.5)  # requests are in flight
            running.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            answered_s = time.monotonic() - signalled
            code = await asyncio.to_thread(running.wait, 60)
            return results, code, answered_s

    results, code, answered_s = asyncio.run(scenario())
    assert code == 0, running.log()
    assert all(isinstance(r, httpx.Response) for r in results), results
    responses = [r for r in results if isinstance(r, httpx.Response)]
    leftovers = [r for r in responses if r.status_code != 200]
    assert leftovers, "the drain timeout must cut some requests short for this test to mean anything"
    for response in leftovers:
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["type"] == "not_ready"
    assert answered_s < 1.0 + 2.0  # at the drain timeout, not when uvicorn would give up
    log = running.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log
