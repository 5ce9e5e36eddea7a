"""The fast ``POST /v1/classify`` path answers exactly as the FastAPI route, and passes on what it does not
answer with the body intact."""

from __future__ import annotations

import json
from typing import Any

import pytest

from model_store.criteria import Criterion
from server.api.fast_v1 import FastClassifyMiddleware
from server.api.routes_v1 import reply_json, to_response
from server.engine.errors import QueueFullError
from server.engine.types import ClassifyResult, RowOutcome
from tests.server.api.conftest import Served, make_settings, serve

TEXT = "win a free prize now"
CASES: list[tuple[str, bytes, dict[str, str]]] = [
    ("one text", json.dumps({"inputs": TEXT}).encode(), {}),
    ("a list", json.dumps({"inputs": [TEXT, "hello there my friend", "ok"]}).encode(), {}),
    ("probs", json.dumps({"inputs": [TEXT], "return_probs": True}).encode(), {}),
    ("options", json.dumps({"inputs": ["a b c"], "speed": 1, "criterion": "patience"}).encode(), {}),
    ("max layers", json.dumps({"inputs": ["a b c d e"], "max_layers": 2}).encode(), {}),
    ("deadline", json.dumps({"inputs": ["a b"], "deadline_ms": 500}).encode(), {}),
    ("accuracy target", json.dumps({"inputs": ["a b"], "max_accuracy_drop": 2.0}).encode(), {}),
    ("unicode", json.dumps({"inputs": ["héllo wörld ✓"]}, ensure_ascii=False).encode(), {}),
    ("json+ content type", json.dumps({"inputs": "x"}).encode(), {"content-type": "application/x+json"}),
    # refused: each comes from the route, through the fast path's hand-over
    ("duplicate key", b'{"inputs": "a", "speed": 0.5, "speed": 0.1}', {}),
    ("not UTF-8", b'{"inputs": "caf\xe9"}', {}),
    ("not JSON", b'{"inputs": ', {}),
    ("NaN", b'{"inputs": "a", "speed": NaN}', {}),
    ("1e999", b'{"inputs": "a", "speed": 1e999}', {}),
    ("lone surrogate", b'{"inputs": ["\\ud800"]}', {}),
    ("string speed", b'{"inputs": "a", "speed": "0.5"}', {}),
    ("float deadline", b'{"inputs": "a", "deadline_ms": 5.0}', {}),
    ("unknown field", b'{"inputs": "a", "sped": 0.5}', {}),
    ("blank text", b'{"inputs": ["ok", "  "]}', {}),
    ("no inputs", b"{}", {}),
    ("an array", b'["a"]', {}),
    ("empty body", b"", {}),
    ("max layers over", b'{"inputs": "a", "max_layers": 99}', {}),
    ("speed and target", b'{"inputs": "a", "speed": 0.5, "max_accuracy_drop": 1}', {}),
    ("best effort, no deadline", b'{"inputs": "a", "on_deadline": "best_effort"}', {}),
    ("pairs for a text model", b'{"inputs": [["a", "b"]]}', {}),
    ("too many inputs", json.dumps({"inputs": ["a"] * 65}).encode(), {}),
    ("text/plain", b'{"inputs": "a"}', {"content-type": "text/plain"}),
    ("no content type", b'{"inputs": "a"}', {"content-type": ""}),
]
PER_REQUEST_HEADERS = {"x-total-time-ms", "x-request-id", "date"}


async def _answer(served: Served, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    sent = {"content-type": "application/json", **headers}
    if sent["content-type"] == "":
        del sent["content-type"]
    response = await served.client.post("/v1/classify", content=body, headers=sent)
    kept = {k: v for k, v in response.headers.items() if k not in PER_REQUEST_HEADERS}
    return response.status_code, response.content, kept


@pytest.mark.parametrize(("name", "body", "headers"), CASES, ids=[c[0] for c in CASES])
async def test_the_fast_path_answers_as_the_route(name: str, body: bytes, headers: dict[str, str]) -> None:
    settings = make_settings(max_inputs_per_request=64)
    async with serve(settings) as fast, serve(settings, fast_classify=False) as route:
        assert await _answer(fast, body, headers) == await _answer(route, body, headers)
        assert len(fast.engine.calls) == len(route.engine.calls)
        assert [(t, o.speed, o.criterion, o.max_layers) for t, o in fast.engine.calls] == [
            (t, o.speed, o.criterion, o.max_layers) for t, o in route.engine.calls
        ]


async def test_engine_errors_and_metrics_match_the_route() -> None:
    async with serve() as fast, serve(fast_classify=False) as route:
        for served in (fast, route):
            served.engine.error = QueueFullError("queue full", retry_after_s=2.5)
        body = json.dumps({"inputs": ["a"]}).encode()
        assert await _answer(fast, body, {}) == await _answer(route, body, {})
        status, _, headers = await _answer(fast, body, {})
        assert status == 429 and headers["retry-after"] == "3"
        labels = {"model": "fake", "route": "/v1/classify", "status": "429"}
        for served, num_requests in ((fast, 2.0), (route, 1.0)):
            assert served.registry.get_sample_value("exitserve_requests_total", labels) == num_requests


class _Recorder:
    """An inner app that records what reaches it and answers 299."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def _call(app: Any, chunks: list[bytes], disconnect_after: int | None = None) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    if disconnect_after is not None:
        messages = [*messages[:disconnect_after], {"type": "http.disconnect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/classify",
        "headers": [(b"content-type", b"application/json")],
    }
    await app(scope, receive, send)
    return sent


async def test_valid_requests_never_reach_the_route_and_the_rest_arrive_whole(served: Served) -> None:
    inner = _Recorder()
    app = FastClassifyMiddleware(inner, served.app.state.exitserve, route=object())
    sent = await _call(app, [b'{"inputs": ', b'["free money"]}'])  # a body in two chunks
    assert sent[0]["status"] == 200 and inner.bodies == []
    assert json.loads(sent[1]["body"])["results"][0]["label"] == "spam"
    refused = b'{"inputs": "a", "sped": 1}'
    assert (await _call(app, [refused[:5], refused[5:]]))[0]["status"] == 299
    assert inner.bodies == [refused]
    assert (await _call(app, [b'{"inputs": ', b'"a"}'], disconnect_after=1))[0]["status"] == 299
    assert inner.bodies[-1] == b'{"inputs": '


ROWS = [
    RowOutcome("spam", 1, 0.75, [0.25, 0.75], 2, 2, False),
    RowOutcome("ham", 0, 1, [1, 0], 1, 3, True, deadline_exit=True, full_depth_agreement=0.9375),
    RowOutcome("spam", 1, 0.5000000000000001, [0.4999999999999999, 0.5000000000000001], 4, 4, False),
]


@pytest.mark.parametrize("return_probs", [False, True])
@pytest.mark.parametrize("degraded", [False, True])
def test_reply_json_is_the_schemas_serialisation(return_probs: bool, degraded: bool) -> None:
    result = ClassifyResult(
        rows=ROWS,
        model="mödel",
        version="3",
        criterion=Criterion.MAX_PROB,
        speed=1,
        queue_time_s=0.001,
        inference_time_s=0.002,
        degraded=degraded,
        requested_criterion=Criterion.NORMALIZED_ENTROPY if degraded else None,
        requested_speed=0.25 if degraded else None,
        predicted_drop_pts=1.5 if degraded else None,
    )
    labels = ["ham", "spam ✓"]
    expected = to_response(result, labels, return_probs).model_dump_json(exclude_none=True).encode()
    assert reply_json(result, labels, return_probs) == expected
