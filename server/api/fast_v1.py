"""``POST /v1/classify`` answered without FastAPI's per-request machinery, for the valid requests.

The route in ``routes_v1.py`` stays the definition (schema, OpenAPI document, every error reply); this
middleware, the innermost of the app's own (after timing, API key and body cap), answers the same
requests the same way for less: in process on a fake engine (no HTTP, no model), a classify request
cost ~190 us through FastAPI's routing, dependency resolution and body handling, ~50 us here
(``BENCHMARKS.md``, "Front-end ceiling").

It reads the body, parses it with the same strict parser and validates it with the same pydantic model
in the same mode as the route, builds the same options and the same reply bytes and headers. Anything it
would not answer exactly as the route does goes to the route instead, with the body replayed: a body
that is not JSON, a validation error (so every 400, 415 and 422 comes from one place), a client gone
while the body streamed, a server still starting. Errors after validation (the engine's 413, 422, 429,
503, 504, an unexpected 500) get ``errors.raised_error_response``, as from the app's exception handlers.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import ApiError, raised_error_response
from server.api.json_body import is_json_content_type, parse_json_strict
from server.api.middleware import scope_header
from server.api.routes_v1 import answer_classify
from server.api.schemas import ClassifyRequest
from server.api.state import AppState, disconnect_watch, scope_start_s, timing_headers

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
            await _send_response(raised_error_response(e, "POST", PATH), scope, send)
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
            disconnect = disconnect_watch(scope, receive)
            data, result = await answer_classify(request, self.state, scope_start_s(scope), disconnect)
        except Exception as e:  # as the app's exception handlers answer it
            await _send_response(raised_error_response(e, "POST", PATH), scope, send)
            return
        headers = [(b"content-length", str(len(data)).encode()), (b"content-type", b"application/json")]
        headers += [(k.lower().encode(), v.encode()) for k, v in timing_headers(result).items()]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data})


def _json_content_type(scope: Scope) -> bool:
    return is_json_content_type(scope_header(scope, b"content-type"))


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
