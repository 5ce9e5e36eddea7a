"""exitserve_client against a live server: answers equal v1's, and a real 429 is retried after its
Retry-After (a server whose queue holds 2 rows refuses a 3-input request every time)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from exitserve_client import AsyncClient, Client, ExitserveError, RetryPolicy
from model_store.store import ModelStore
from tests.e2e.conftest import ServerProcess, start_server

TEXTS = ["free money now", "team lunch at noon", "invoice attached"]


@pytest.fixture(scope="module")
def small_queue(tiny_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log: Path = tmp_path_factory.mktemp("log") / "server.log"
    running = start_server(tiny_store.root, log, "--max-queue-size", "2", "--max-queue-wait-ms", "none")
    yield running
    running.terminate()


def _num_429(server: ServerProcess) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    pattern = r'^exitserve_requests_total\{[^}]*route="/v1/classify"[^}]*status="429"[^}]*\} ([0-9.e+]+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def test_answers_equal_the_v1_route(server: ServerProcess) -> None:
    with Client(server.base_url) as client:
        result = client.classify(TEXTS, speed=0.5, return_probs=True)
        assert client.ready() and client.models()[0]["name"] == "tiny"
    raw = httpx.post(f"{server.base_url}/v1/classify", json={"inputs": TEXTS, "speed": 0.5}).json()
    assert [p.label for p in result.predictions] == [row["label"] for row in raw["results"]]
    assert [p.exit_layer for p in result.predictions] == [row["exit_layer"] for row in raw["results"]]
    assert all(p.probs is not None for p in result.predictions) and result.total_time_ms is not None
    with Client(server.base_url) as client, pytest.raises(ExitserveError) as bad:
        client.classify("x", speed=3.0)
    assert bad.value.status == 422 and bad.value.field == "speed"


def test_a_real_429_is_retried_after_its_retry_after(small_queue: ServerProcess) -> None:
    before = _num_429(small_queue)
    policy = RetryPolicy(max_retries=1, max_retry_wait_s=5.0)
    started = time.monotonic()
    with Client(small_queue.base_url, retry=policy) as client, pytest.raises(ExitserveError) as refused:
        client.classify(TEXTS)  # 3 rows never fit a 2-row queue
    elapsed_s = time.monotonic() - started
    assert refused.value.status == 429 and refused.value.num_attempts == 2
    assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 1
    assert elapsed_s >= refused.value.retry_after_s  # it waited as told before the retry
    assert _num_429(small_queue) - before == 2  # the server refused both attempts
    with Client(small_queue.base_url, retry=policy) as client:
        assert len(client.classify(TEXTS[:2]).predictions) == 2


async def test_async_client(server: ServerProcess) -> None:
    async with AsyncClient(server.base_url) as client:
        result = await client.classify(TEXTS[0], speed=1.0, criterion="max_prob", deadline_ms=5000)
    assert result.predictions[0].exit_layer == 1 and result.num_attempts == 1
