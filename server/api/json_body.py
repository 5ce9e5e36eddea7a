"""Strict JSON request bodies: UTF-8 only, no duplicate keys.

Python's ``json`` module takes the last of two equal keys and guesses UTF-16/32 encodings, so
``{"speed": 0.9, "speed": 0.1}`` or a Latin-1 body would be served silently. A route class swaps in a
request whose ``json()`` refuses both with a 400 naming the problem; FastAPI then validates the parsed
value against the route's schema as usual (and the schema still shows up in the OpenAPI document).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from server.api.errors import ApiError


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ApiError(400, "invalid_json", f"duplicate key {key!r} in a JSON object", field=key)
        result[key] = value
    return result


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)  # json.loads would build one per call


def parse_json_strict(body: bytes) -> Any:
    """Decode ``body`` as UTF-8 JSON; 400 on invalid UTF-8, invalid JSON or duplicate keys."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid_utf8", f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as e:
        message = f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        raise ApiError(400, "invalid_json", message) from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "request body nests too deeply") from None


class StrictJSONRequest(Request):
    """A request whose ``json()`` is :func:`parse_json_strict`."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_strict(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """An APIRoute that reads bodies with :class:`StrictJSONRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def strict_handler(request: Request) -> Response:
            if takes_body and not is_json_content_type(request.headers.get("content-type")):
                raise ApiError(
                    415, "unsupported_media_type", "send the body as JSON: Content-Type: application/json"
                )
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler


def is_json_content_type(content_type: str | None) -> bool:
    """``application/json`` or ``application/<anything>+json``, with or without parameters."""
    if content_type is None:
        return False
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )
