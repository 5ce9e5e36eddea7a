"""Errors at the API edge: one table from error kind to HTTP status, one body shape for every error.

Every non-2xx reply has the body ``{"error": {"type": str, "message": str, "field": str | null}}`` —
engine errors, request validation, unknown routes, size limits, auth and unexpected failures alike.
A 500 says only "internal server error"; the details go to the log.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.errors import (
    BatchFailedError,
    DeadlineExceededError,
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
    PayloadTooLargeError,
    QueueFullError,
    RequestCancelledError,
)

logger = logging.getLogger("exitserve.api")

GENERIC_500_MESSAGE = "internal server error"
CLIENT_CLOSED_REQUEST = 499  # nginx's code; only ever seen in logs and metrics, the client is gone

# The one table: engine error kind -> (HTTP status, error type).
ENGINE_ERROR_STATUS: dict[type[EngineError], tuple[int, str]] = {
    InvalidRequestError: (422, "invalid_request"),
    PayloadTooLargeError: (413, "payload_too_large"),
    QueueFullError: (429, "queue_full"),
    DeadlineExceededError: (504, "deadline_exceeded"),
    NotReadyError: (503, "not_ready"),
    ModelNotFoundError: (404, "model_not_found"),
    BatchFailedError: (500, "internal_error"),
    RequestCancelledError: (CLIENT_CLOSED_REQUEST, "client_closed_request"),
}
# Error types of plain HTTP statuses (unknown route, wrong method, body limits, auth).
HTTP_STATUS_TYPES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    500: "internal_error",
}


class ApiError(StarletteHTTPException):
    """An HTTP error raised by the API layer itself, with an error type and the field at fault.

    A subclass of Starlette's HTTPException so that FastAPI re-raises it unchanged while reading a body.
    """

    def __init__(
        self,
        status_code: int,
        error_type: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.error_type = error_type
        self.message = message
        self.field = field


V2_PREFIX = "/v2"
TEI_PATHS = frozenset({"/", "/predict", "/info", "/health"})


def error_flavour(path: str) -> str:
    """Which protocol's error body a path answers with: "v2" (Open Inference Protocol), "tei"
    (text-embeddings-inference and the Hugging Face inference API) or "v1" (ours)."""
    if path == V2_PREFIX or path.startswith(V2_PREFIX + "/"):
        return "v2"
    return "tei" if path in TEI_PATHS else "v1"


def error_body(
    error_type: str, message: str, field: str | None = None, flavour: str = "v1"
) -> dict[str, Any]:
    """The one error body shape, or the protocol's where a client of that protocol reads it: v2's
    ``error`` is the message, a string (Triton's clients read it so; ``type`` and ``field`` ride along
    beside it), TEI's has ``error`` and ``error_type`` (``field`` beside them)."""
    if flavour == "v2":
        return {"error": message, "type": error_type, "field": field}
    if flavour == "tei":
        return {"error": message, "error_type": error_type, "field": field}
    return {"error": {"type": error_type, "message": message, "field": field}}


def error_body_bytes(error_type: str, message: str, field: str | None = None, flavour: str = "v1") -> bytes:
    """The error body as bytes, for pure ASGI middleware that answers before the app runs."""
    return json.dumps(error_body(error_type, message, field, flavour)).encode()


def error_response(
    status: int,
    error_type: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    flavour: str = "v1",
) -> JSONResponse:
    """A JSON reply in the one error shape (a protocol's on its routes, see ``error_flavour``)."""
    body = error_body(error_type, message, field, flavour)
    return JSONResponse(body, status_code=status, headers=headers)


def api_error_response(error: ApiError, flavour: str = "v1") -> JSONResponse:
    """The reply to an error the API layer raised itself (its status, type, message, field, headers)."""
    return error_response(
        error.status_code, error.error_type, error.message, error.field, error.headers, flavour
    )


def unexpected_error_response(method: str, path: str, error: BaseException) -> JSONResponse:
    """500 with the generic message; the details go to the log."""
    logger.exception("unhandled error on %s %s", method, path, exc_info=error)
    return error_response(500, "internal_error", GENERIC_500_MESSAGE, flavour=error_flavour(path))


def raised_error_response(error: Exception, method: str, path: str) -> JSONResponse:
    """What the app's exception handlers answer for an error raised while a valid request is served:
    an engine error, an ``ApiError``, or anything else (500, logged)."""
    if isinstance(error, EngineError):
        return engine_error_response(error, error_flavour(path))
    if isinstance(error, ApiError):
        return api_error_response(error, error_flavour(path))
    return unexpected_error_response(method, path, error)


def status_for(error: EngineError) -> tuple[int, str]:
    """The (status, type) of an engine error, by its most specific class in the table."""
    for cls in type(error).__mro__:
        if cls in ENGINE_ERROR_STATUS:
            return ENGINE_ERROR_STATUS[cls]  # type: ignore[index]
    return 500, "internal_error"


def engine_error_response(error: EngineError, flavour: str = "v1") -> JSONResponse:
    """Map an engine error to its reply (Retry-After on 429, generic message on 500)."""
    status, error_type = status_for(error)
    if status >= 500 and status != 503 and status != 504:
        logger.error("engine error %s: %s", type(error).__name__, error.public_message)
        return error_response(status, error_type, GENERIC_500_MESSAGE, flavour=flavour)
    headers = None
    if isinstance(error, QueueFullError):
        headers = {"Retry-After": str(max(1, math.ceil(error.retry_after_s)))}
    field = error.field if isinstance(error, InvalidRequestError) else None
    return error_response(status, error_type, error.public_message, field, headers, flavour)


def field_from_loc(loc: Sequence[int | str]) -> str | None:
    """``("body", "inputs", 2)`` -> ``"inputs[2]"``; the leading "body"/"query"/"path" is dropped."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    field = ""
    for part in parts:
        if isinstance(part, int):
            field += f"[{part}]"
        else:
            field += f".{part}" if field else str(part)
    return field or None


def validation_error_response(error: RequestValidationError, flavour: str = "v1") -> JSONResponse:
    """The first validation problem, naming its field (422), or 400 for a body that is not JSON."""
    errors = error.errors()
    first: dict[str, Any] = dict(errors[0]) if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        return error_response(
            400, "invalid_json", f"request body is not valid JSON: {reason}", flavour=flavour
        )
    loc = tuple(first.get("loc", ()))
    field = field_from_loc(loc)
    if loc == ("body",):
        if first.get("type") == "missing":
            return error_response(422, "invalid_request", "a JSON request body is required", flavour=flavour)
        return error_response(
            422, "invalid_request", "the request body must be a JSON object", flavour=flavour
        )
    message = str(first.get("msg", "invalid value"))
    if field and not message.startswith(field):
        message = f"{field}: {message}"
    elif field and (element := re.match(re.escape(field) + r"\[\d+\]", message)):
        field = element.group(0)  # a check of one list element names it: "inputs[3]", not "inputs"
    return error_response(422, "invalid_request", message, field, flavour=flavour)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error kind through the one body shape."""

    async def on_engine_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, EngineError)
        return engine_error_response(exc, error_flavour(request.url.path))

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error_response(exc, error_flavour(request.url.path))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        flavour = error_flavour(request.url.path)
        if isinstance(exc, ApiError):
            return api_error_response(exc, flavour)
        error_type = HTTP_STATUS_TYPES.get(exc.status_code, "http_error")
        if exc.status_code >= 500:
            return error_response(
                exc.status_code, error_type, GENERIC_500_MESSAGE, None, exc.headers, flavour
            )
        message = exc.detail if isinstance(exc.detail, str) else error_type.replace("_", " ")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, error_type, message, None, exc.headers, flavour)

    async def on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        return unexpected_error_response(request.method, request.url.path, exc)

    app.add_exception_handler(EngineError, on_engine_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
