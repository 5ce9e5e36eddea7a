"""``POST /v1/classify`` answered without FastAPI's per-request machinery, for the valid requests.

The route in ``routes_v1.py`` stays the definition (schema, OpenAPI document, every error reply); this
middleware, the innermost of the app's own (after timing, API key and body cap), answers the same
requests the same way for less: measured in process on a fake engine, FastAPI's routing, dependency
resolution and body handling took about 60 % of a classify request's time in the app, more than
the handler itself (``BENCHMARKS.md``, "Front-end ceiling").

It reads the body, parses it with the same strict parser and validates it with the same pydantic model
in the same mode as the route, builds the same options and the same reply bytes and headers. Anything it
would not answer exactly as the route does goes to the route instead, with the body replayed: a body
that is not JSON, a validation error (so every 400, 415 and 422 comes from one place), a client gone
while the body streamed, a server still starting. Errors after validation (the engine's 413, 422, 429,
503, 504, an unexpected 500) use the same functions as the app's exception handlers.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import (
    GENERIC_500_MESSAGE,
    ApiError,
    api_error_response,
    engine_error_response,
    error_response,
)
from server.api.json_body import is_json_content_type, parse_json_strict
from server.api.routes_v1 import answer_classify
from server.api.schemas import ClassifyRequest
from server.api.state import AppState, scope_start_s, timing_headers
from server.engine.errors import EngineError

logger = logging.getLogger("exitserve.api")
PATH = "/v1/classify"


class FastClassifyMiddleware:
    """Answers valid ``POST /v1/classify`` requests itself; passes everything else to ``app``.

    ``route``: the route object of ``POST /v1/classify``, put in the scope as the router would (the
    timing middleware labels metrics and logs with its path).
    """

    def __init__(self, app: ASGIApp, state: AppState, route: object) -> None:
        self.app = app
        self.state = state
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != PATH
            or scope["method"] != "POST"
            or self.state.engine is None
            or not _json_content_type(scope)
        ):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":  # gone mid-body: the route's way of handling it
                    await self.app(scope, _replay(chunks, receive, message), send)
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        except ApiError as e:  # the body cap, counted while it streamed
            await _send_response(api_error_response(e), scope, send)
            return
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            request = ClassifyRequest.model_validate(parse_json_strict(body))
        except (ApiError, ValidationError):
            await self.app(scope, _replay([body], receive, None), send)
            return
        scope["route"] = self.route
        await self._classify(request, scope, receive, send)

    async def _classify(self, request: ClassifyRequest, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            data, result = await answer_classify(request, self.state, scope_start_s(scope), receive)
        except EngineError as e:
            await _send_response(engine_error_response(e), scope, send)
            return
        except ApiError as e:
            await _send_response(api_error_response(e), scope, send)
            return
        except Exception:
            logger.exception("unhandled error on POST %s", PATH)
            await _send_response(error_response(500, "internal_error", GENERIC_500_MESSAGE), scope, send)
            return
        headers = [(b"content-length", str(len(data)).encode()), (b"content-type", b"application/json")]
        headers += [(k.lower().encode(), v.encode()) for k, v in timing_headers(result).items()]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data})


def _json_content_type(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return is_json_content_type(value.decode("latin-1"))
    return False


def _replay(chunks: list[bytes], receive: Receive, last: Message | None) -> Receive:
    """A ``receive`` that gives the body read so far as one message (then ``last``, if any), then the
    connection's own messages."""
    body = b"".join(chunks)
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": last is not None}]
    if last is not None:
        pending.append(last)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


async def _send_response(response: Any, scope: Scope, send: Send) -> None:
    async def no_receive() -> Message:  # a plain response reads nothing
        return {"type": "http.disconnect"}

    await response(scope, no_receive, send)
