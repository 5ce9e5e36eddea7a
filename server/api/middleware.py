"""Pure ASGI middleware: request timing, metrics and access log; API key; body size cap.

Pure ASGI (not BaseHTTPMiddleware) so bodies stream through untouched and the cost per request stays a
few function calls. The access log names method, route, status and time — never request texts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import CLIENT_CLOSED_REQUEST, ApiError, error_body_bytes, error_flavour
from server.api.state import REQUEST_START_KEY, format_ms
from server.logs import request_id_from, request_id_var
from server.metrics import ServerMetrics

access_logger = logging.getLogger("exitserve.access")
UNMATCHED_ROUTE = "unmatched"  # metrics label for paths no route matched (keeps cardinality bounded)


async def send_error(
    send: Send,
    status: int,
    error_type: str,
    message: str,
    extra_headers: Iterable[tuple[str, str]] = (),
    flavour: str = "v1",
) -> None:
    """Answer with the one error body shape (the protocol's on v2 routes), from middleware that runs
    before the app."""
    body = error_body_bytes(error_type, message, None, flavour)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def route_template(scope: Scope) -> str:
    """The matched route's path template (``/v2/models/{name}/infer``), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE


def scope_header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), without building a Headers object."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class TimingMiddleware:
    """Stamps the arrival time and the request id (``server/logs.py``), adds X-Total-Time-Ms and
    X-Request-Id, records HTTP metrics, writes the access log."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start_s = time.monotonic()
        scope[REQUEST_START_KEY] = start_s
        request_id = request_id_from(scope_header(scope, b"x-request-id"))
        token = request_id_var.set(request_id)
        status = 500  # if the app raises before answering, ServerErrorMiddleware answers 500
        started = False

        async def timed_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                total = format_ms(time.monotonic() - start_s)
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        (b"x-total-time-ms", total.encode()),
                        (b"x-request-id", request_id.encode()),
                    ],
                }
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except asyncio.CancelledError:
            # The HTTP server gave up on this request (shutdown past its grace period): the client still
            # gets the one error body, not the server's plain-text 500.
            if not started:
                with contextlib.suppress(Exception):
                    await send_error(
                        timed_send,
                        503,
                        "not_ready",
                        "server shutting down; retry",
                        flavour=error_flavour(scope["path"]),
                    )
            raise
        finally:
            duration_s = time.monotonic() - start_s
            route = route_template(scope)
            self.metrics.http_request(route, status, duration_s)
            level = logging.INFO if status != CLIENT_CLOSED_REQUEST else logging.DEBUG
            if access_logger.isEnabledFor(level):  # (its arguments are not built for nothing)
                access_logger.log(
                    level,
                    "%s %s %d %.1fms",
                    scope["method"],
                    route,
                    status,
                    duration_s * 1000.0,
                    extra={
                        "method": scope["method"],
                        "route": route,
                        "status": status,
                        "duration_ms": round(duration_s * 1000.0, 3),
                    },
                )
            request_id_var.reset(token)


class ApiKeyMiddleware:
    """Requires ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` except on open paths (401)."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: Iterable[str]) -> None:
        self.app = app
        self.api_key = api_key.encode()
        self.open_paths = frozenset(open_paths)

    def _authorized(self, headers: Headers) -> bool:
        presented = headers.get("x-api-key")
        if presented is None:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            presented = token.strip() if scheme.lower() == "bearer" else None
        # Compare in constant time; compare_digest on bytes, as str requires ASCII.
        return presented is not None and hmac.compare_digest(presented.encode(), self.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        if not self._authorized(Headers(scope=scope)):
            message = "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            await send_error(
                send,
                401,
                "unauthorized",
                message,
                [("WWW-Authenticate", "Bearer")],
                error_flavour(scope["path"]),
            )
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses bodies over ``max_body_bytes`` with 413, before any of the body is parsed.

    A Content-Length over the cap is refused before reading; a chunked body is counted as it streams
    and refused once it passes the cap.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self) -> str:
        return f"request body is over the {self.max_body_bytes}-byte limit"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        content_length = scope_header(scope, b"content-length")
        if content_length is not None:
            if not content_length.isdigit():
                await send_error(
                    send,
                    400,
                    "bad_request",
                    "Content-Length is not a number",
                    flavour=error_flavour(scope["path"]),
                )
                return
            if int(content_length) > self.max_body_bytes:
                await send_error(
                    send, 413, "payload_too_large", self._too_large(), flavour=error_flavour(scope["path"])
                )
                return
        num_bytes = 0

        async def counting_receive() -> Message:
            nonlocal num_bytes
            message = await receive()
            if message["type"] == "http.request":
                num_bytes += len(message.get("body", b""))
                if num_bytes > self.max_body_bytes:
                    raise ApiError(413, "payload_too_large", self._too_large())
            return message

        await self.app(scope, counting_receive, send)
