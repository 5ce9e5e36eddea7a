"""A small fake classify server on a free loopback port (uvicorn in a thread), no torch model.

Its rule is known, so every expected number is too: the label is "spam" when the text contains "spam",
else "ham"; ``exit_layer`` is 1 + (number of words mod 3); a text starting "status:NNN" is answered with
that status; "sleep:S" sleeps S seconds first. Every request body it got is kept in ``bodies``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from loadtest.servers import free_port


@dataclass
class FakeServer:
    url: str
    bodies: list[dict[str, Any]] = field(default_factory=list)


def fake_app(state: FakeServer) -> Starlette:
    async def classify(request: Request) -> JSONResponse:
        body = await request.json()
        state.bodies.append(body)
        text = body["inputs"]
        if text.startswith("sleep:"):
            await asyncio.sleep(float(text.split(":", 1)[1].split()[0]))
        if text.startswith("status:"):
            status = int(text.split(":", 1)[1][:3])
            return JSONResponse(
                {"error": {"type": "fake", "message": text, "field": None}}, status_code=status
            )
        label = "spam" if "spam" in text else "ham"
        exit_layer = 1 + len(text.split()) % 3
        result = {"label": label, "score": 0.9, "exit_layer": exit_layer, "num_layers_run": exit_layer}
        return JSONResponse(
            {"model": "fake", "version": "1", "speed": body.get("speed", 0.0), "results": [result]}
        )

    async def readyz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ready"})

    async def chunked(request: Request) -> StreamingResponse:
        async def parts() -> AsyncIterator[bytes]:
            for part in (b'{"a": ', b"1", b"}"):
                yield part

        return StreamingResponse(parts(), media_type="application/json")

    async def close(request: Request) -> PlainTextResponse:
        return PlainTextResponse("bye", headers={"connection": "close"})

    return Starlette(
        routes=[
            Route("/v1/classify", classify, methods=["POST"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/chunked", chunked, methods=["GET"]),
            Route("/close", close, methods=["GET"]),
        ]
    )


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeServer]:
    port = free_port()
    state = FakeServer(url=f"http://127.0.0.1:{port}")
    config = uvicorn.Config(
        fake_app(state),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        ws="none",
        timeout_keep_alive=1,  # idle connections close after 1 s (uvicorn default: 5 s)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    yield state
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def server(fake_server: FakeServer) -> FakeServer:
    fake_server.bodies.clear()
    return fake_server
