"""Every error status, in the one body shape {"error": {"type", "message", "field"}}."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest

from server.engine.errors import (
    BatchFailedError,
    DeadlineExceededError,
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
    PayloadTooLargeError,
    QueueFullError,
)
from tests.server.api.conftest import Served, assert_error, make_settings, serve

CLASSIFY = "/v1/classify"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"inputs": ""}, "inputs[0]"),
        ({"inputs": "   \n\t"}, "inputs[0]"),
        ({"inputs": []}, "inputs"),
        ({"inputs": ["ok", " "]}, "inputs[1]"),
        ({"inputs": ["ok", 3]}, "inputs[1]"),
        ({"inputs": 3}, "inputs"),
        ({"inputs": None}, "inputs"),
        ({}, "inputs"),
        ({"inputs": "hi", "speed": -0.1}, "speed"),
        ({"inputs": "hi", "speed": 1.5}, "speed"),
        ({"inputs": "hi", "speed": "0.5"}, "speed"),
        ({"inputs": "hi", "speed": True}, "speed"),
        ({"inputs": "hi", "criterion": "fastest"}, "criterion"),
        ({"inputs": "hi", "max_layers": 0}, "max_layers"),
        ({"inputs": "hi", "max_layers": 2.5}, "max_layers"),
        ({"inputs": "hi", "max_layers": 5}, "max_layers"),  # the fake model has 4 layers
        ({"inputs": "hi", "return_probs": "yes"}, "return_probs"),
        ({"inputs": "hi", "deadline_ms": 0}, "deadline_ms"),
        ({"inputs": "hi", "deadline_ms": "100"}, "deadline_ms"),
        ({"inputs": "hi", "sped": 0.5}, "sped"),
    ],
)
async def test_validation_422_names_the_field(served: Served, body: dict[str, object], field: str) -> None:
    response = await served.client.post(CLASSIFY, json=body)
    message = assert_error(response, 422, "invalid_request", field)
    assert field in message
    assert served.engine.calls == []


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (rb'{"inputs": "\ud800"}', "inputs[0]"),  # a lone surrogate: valid JSON, but no text
        (rb'{"inputs": ["ok", "caf\udfff!"]}', "inputs[1]"),
    ],
)
async def test_lone_surrogate_is_a_422_naming_the_input(
    served: Served, content: bytes, field: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        response = await served.client.post(
            CLASSIFY, content=content, headers={"content-type": "application/json"}
        )
    message = assert_error(response, 422, "invalid_request", field)
    assert message.startswith(f"{field} is not valid Unicode text")
    assert served.engine.calls == []
    # A client error is one access-log line: no traceback, nothing at warning or above.
    assert [r.levelno for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert all(r.exc_info is None for r in caplog.records)


async def test_lone_surrogate_on_v2_is_a_422(served: Served) -> None:
    content = rb'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["\ud800"]}]}'
    response = await served.client.post(
        "/v2/models/fake/infer", content=content, headers={"content-type": "application/json"}
    )
    message = assert_error(response, 422, "invalid_request", "inputs[0].data")
    assert "inputs[0].data[0] is not valid Unicode text" in message


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_non_finite_speed_422(served: Served, literal: str) -> None:
    content = '{"inputs": "hi", "speed": ' + literal + "}"
    response = await served.client.post(
        CLASSIFY, content=content, headers={"content-type": "application/json"}
    )
    assert_error(response, 422, "invalid_request", "speed")


@pytest.mark.parametrize(
    ("content", "error_type", "field"),
    [
        (b'{"inputs": "hi", "speed": 0.9, "speed": 0.1}', "invalid_json", "speed"),
        (b'{"inputs": {"a": 1, "a": 2}}', "invalid_json", "a"),
        (b'{"inputs": "caf\xe9"}', "invalid_utf8", None),
        (b'{"inputs": "hi",', "invalid_json", None),
        (b"not json", "invalid_json", None),
    ],
)
async def test_malformed_body_400(served: Served, content: bytes, error_type: str, field: str | None) -> None:
    response = await served.client.post(
        CLASSIFY, content=content, headers={"content-type": "application/json"}
    )
    assert_error(response, 400, error_type, field)


async def test_body_over_cap_413_before_parsing() -> None:
    async with serve(make_settings(max_body_bytes=1000)) as s:
        ok = await s.client.post(CLASSIFY, json={"inputs": "a" * 900})
        assert ok.status_code == 200
        # Not even JSON: refused on its Content-Length, never parsed.
        big = await s.client.post(CLASSIFY, content=b"x" * 1001, headers={"content-type": "application/json"})
        assert_error(big, 413, "payload_too_large")


async def test_chunked_body_over_cap_413() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"inputs": "'
        for _ in range(20):
            yield b"a" * 100
        yield b'"}'

    async with serve(make_settings(max_body_bytes=1000)) as s:
        response = await s.client.post(
            CLASSIFY, content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in response.request.headers
        assert_error(response, 413, "payload_too_large")
        assert s.engine.calls == []


async def test_too_many_inputs_413() -> None:
    async with serve(make_settings(max_inputs_per_request=3)) as s:
        assert (await s.client.post(CLASSIFY, json={"inputs": ["a", "b", "c"]})).status_code == 200
        response = await s.client.post(CLASSIFY, json={"inputs": ["a", "b", "c", "d"]})
        message = assert_error(response, 413, "payload_too_large")
        assert "at most 3" in message


@pytest.mark.parametrize(
    ("error", "status", "error_type", "field"),
    [
        (
            InvalidRequestError("max_layers too deep", field="max_layers"),
            422,
            "invalid_request",
            "max_layers",
        ),
        (PayloadTooLargeError("inputs[0] is longer than 32 tokens"), 413, "payload_too_large", None),
        (QueueFullError("queue is full", retry_after_s=2.2), 429, "queue_full", None),
        (DeadlineExceededError("deadline passed"), 504, "deadline_exceeded", None),
        (NotReadyError("restarting"), 503, "not_ready", None),
        (ModelNotFoundError("no such model"), 404, "model_not_found", None),
    ],
)
async def test_engine_errors_map_to_status(
    served: Served, error: EngineError, status: int, error_type: str, field: str | None
) -> None:
    served.engine.error = error
    response = await served.client.post(CLASSIFY, json={"inputs": "hi"})
    assert assert_error(response, status, error_type, field) == error.public_message
    if status == 429:
        assert response.headers["retry-after"] == "3"
    else:
        assert "retry-after" not in response.headers


@pytest.mark.parametrize(
    "error", [BatchFailedError("CUDA out of memory at layer 3"), RuntimeError("secret detail")]
)
async def test_500_is_generic(served: Served, error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    served.engine.error = error
    response = await served.client.post(CLASSIFY, json={"inputs": "hi"})
    assert assert_error(response, 500, "internal_error") == "internal server error"
    assert "secret" not in response.text and "CUDA" not in response.text
    assert any(str(error) in record.getMessage() or record.exc_info for record in caplog.records)


async def test_not_ready_before_start_503() -> None:
    async with serve(start=False) as s:
        assert_error(await s.client.post(CLASSIFY, json={"inputs": "hi"}), 503, "not_ready")
        assert_error(await s.client.get("/v1/models"), 503, "not_ready")


async def test_unknown_route_and_method(served: Served) -> None:
    message = assert_error(await served.client.get("/v1/nope"), 404, "not_found")
    assert "/v1/nope" in message
    response = await served.client.get(CLASSIFY)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_wrong_content_type_415(served: Served, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = await served.client.post(CLASSIFY, content=json.dumps({"inputs": "hi"}), headers=headers)
    assert "application/json" in assert_error(response, 415, "unsupported_media_type")
    ok = {"content-type": "application/json; charset=utf-8"}
    assert (
        await served.client.post(CLASSIFY, content=json.dumps({"inputs": "hi"}), headers=ok)
    ).status_code == 200


@pytest.mark.parametrize("content", [b"[1]", b'"hi"', b"null"])
async def test_body_not_an_object_422(served: Served, content: bytes) -> None:
    response = await served.client.post(
        CLASSIFY, content=content, headers={"content-type": "application/json"}
    )
    assert assert_error(response, 422, "invalid_request") == "the request body must be a JSON object"


async def test_a_request_cancelled_by_the_http_server_still_gets_the_json_503() -> None:
    """uvicorn cancels requests still open past its shutdown grace; the client gets the one error body."""
    from server.api.middleware import TimingMiddleware
    from server.metrics import Registry, ServerMetrics

    async def never_answers(scope: object, receive: object, send: object) -> None:
        raise asyncio.CancelledError

    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    middleware = TimingMiddleware(never_answers, ServerMetrics("m", Registry()))  # type: ignore[arg-type]
    scope = {"type": "http", "method": "POST", "path": "/v1/classify", "headers": []}
    with pytest.raises(asyncio.CancelledError):
        await middleware(scope, receive, send)  # type: ignore[arg-type]
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 503
    body = json.loads(sent[1]["body"])  # type: ignore[arg-type]
    assert body["error"]["type"] == "not_ready"
