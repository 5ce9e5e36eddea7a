"""exitserve_client against scripted replies (httpx.MockTransport): retries, Retry-After, deadlines."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from exitserve_client import AsyncClient, Client, ExitserveError, RetryPolicy

pytestmark = pytest.mark.unit

OK = {
    "model": "m",
    "version": "1",
    "speed": 0.5,
    "criterion": "max_prob",
    "results": [
        {"label": "spam", "score": 0.9, "exit_layer": 2, "num_layers_run": 2, "truncated": False,
         "full_depth_agreement": 0.99},
    ],
}  # fmt: skip


class Script:
    """Answers each request with the next (status, headers, body); records what was sent."""

    def __init__(self, *replies: tuple[int, dict[str, str], object]) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []
        self.sent_at: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.sent_at.append(time.monotonic())
        status, headers, body = self.replies.pop(0)
        return httpx.Response(status, headers=headers, json=body)

    def bodies(self) -> list[dict[str, object]]:
        return [json.loads(r.content) for r in self.requests]


def _overloaded(retry_after: str) -> tuple[int, dict[str, str], object]:
    error = {"error": {"type": "overloaded", "message": "queue full", "field": None}}
    return 429, {"Retry-After": retry_after}, error


def test_a_429_is_retried_after_retry_after_and_the_result_is_typed() -> None:
    script = Script(_overloaded("0.2"), (200, {"X-Total-Time-Ms": "3.5"}, OK))
    with Client("http://server", api_key="k3y", transport=httpx.MockTransport(script)) as client:
        result = client.classify("free money", speed=0.5, return_probs=False)
    assert result.num_attempts == 2
    assert script.sent_at[1] - script.sent_at[0] >= 0.2
    (prediction,) = result.predictions
    assert (prediction.label, prediction.exit_layer, prediction.full_depth_agreement) == ("spam", 2, 0.99)
    assert result.total_time_ms == 3.5 and not result.degraded
    assert script.bodies()[0] == {"inputs": "free money", "speed": 0.5}
    assert script.requests[0].headers["authorization"] == "Bearer k3y"


def test_retries_stop_at_the_cap_and_client_errors_are_not_retried() -> None:
    script = Script(_overloaded("0"), _overloaded("0"), _overloaded("0"))
    with (
        Client("http://s", retry=RetryPolicy(max_retries=2), transport=httpx.MockTransport(script)) as client,
        pytest.raises(ExitserveError) as refused,
    ):
        client.classify(["a", "b"])
    assert (refused.value.status, refused.value.num_attempts, refused.value.error_type) == (
        429,
        3,
        "overloaded",
    )
    invalid = {"error": {"type": "invalid_request", "message": "speed: too big", "field": "speed"}}
    script = Script((422, {}, invalid))
    with (
        Client("http://s", transport=httpx.MockTransport(script)) as client,
        pytest.raises(ExitserveError) as bad,
    ):
        client.classify("a", speed=7)
    assert (bad.value.status, bad.value.field, bad.value.num_attempts) == (422, "speed", 1)
    # A Retry-After longer than the client waits for is not slept through.
    script = Script(_overloaded("60"))
    with Client("http://s", transport=httpx.MockTransport(script)) as client:
        started = time.monotonic()
        with pytest.raises(ExitserveError):
            client.classify("a")
    assert time.monotonic() - started < 1.0


def test_the_deadline_bounds_every_retry_and_is_sent_as_what_is_left() -> None:
    script = Script(_overloaded("0.1"), (200, {}, OK))
    with Client("http://s", transport=httpx.MockTransport(script)) as client:
        client.classify("a", deadline_ms=2000)
    first, second = (int(body["deadline_ms"]) for body in script.bodies())  # type: ignore[call-overload]
    assert first <= 2000 and second <= first - 100
    # A wait that would end after the deadline is not taken.
    script = Script(_overloaded("0.5"))
    with (
        Client("http://s", transport=httpx.MockTransport(script)) as client,
        pytest.raises(ExitserveError) as late,
    ):
        client.classify("a", deadline_ms=300)
    assert late.value.num_attempts == 1


async def test_async_client_retries_the_same_way() -> None:
    script = Script(
        (503, {}, {"error": {"type": "not_ready", "message": "restarting", "field": None}}), (200, {}, OK)
    )
    async with AsyncClient("http://s", transport=httpx.MockTransport(script)) as client:
        result = await client.classify(["free"], criterion="max_prob")
    assert result.num_attempts == 2 and result.criterion == "max_prob"
