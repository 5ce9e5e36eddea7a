"""Serve the app over ASGI (httpx) with the fake engine, lifespan included."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from server.api import create_app
from server.engine.types import EngineObserver
from server.metrics import Registry
from server.settings import Settings
from tests.server.api.fakes import FakeEngine


@pytest.fixture(autouse=True)
def _no_exitserve_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings in these tests come from the test alone, not from the shell's EXITSERVE_* variables."""
    import os

    for name in list(os.environ):
        if name.startswith("EXITSERVE_"):
            monkeypatch.delenv(name)


def make_settings(**overrides: Any) -> Settings:
    """Test settings: the fake model's name, everything else as given or default."""
    return Settings(**{"model": "fake", **overrides})


@dataclass
class Served:
    """An app under test, its client, its engine and its metrics registry."""

    app: FastAPI
    client: httpx.AsyncClient
    engine: FakeEngine
    registry: Registry


@asynccontextmanager
async def serve(
    settings: Settings | None = None, start: bool = True, fast_classify: bool = True, freeze_gc: bool = False
) -> AsyncIterator[Served]:
    """The app with a fresh registry and fake engine; ``start=False`` skips the lifespan (not ready);
    ``fast_classify=False``: every classify request through the FastAPI route; ``freeze_gc``: as a
    served process starts (patch ``gc`` first: a test process must not freeze its objects)."""
    registry = Registry()
    engines: list[FakeEngine] = []

    def factory(observer: EngineObserver) -> FakeEngine:
        engines.append(FakeEngine(observer))
        return engines[-1]

    app = create_app(
        settings or make_settings(),
        factory,
        registry=registry,
        fast_classify=fast_classify,
        freeze_gc=freeze_gc,
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        if not start:
            yield Served(app, client, FakeEngine(observer=app.state.exitserve.metrics), registry)
            return
        async with app.router.lifespan_context(app):
            yield Served(app, client, engines[0], registry)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    """A started app with default test settings."""
    async with serve() as s:
        yield s


def assert_error(response: httpx.Response, status: int, error_type: str, field: str | None = None) -> str:
    """The reply has ``status`` and the one error shape (on /v2, the protocol's: ``error`` is the message,
    ``type`` and ``field`` beside it); returns the message."""
    assert response.status_code == status, response.text
    body = response.json()
    if response.request.url.path.startswith("/v2"):
        assert set(body) == {"error", "type", "field"}, body
        assert body["type"] == error_type and body["field"] == field, body
        assert isinstance(body["error"], str) and body["error"]
        return str(body["error"])
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "message", "field"}
    assert body["error"]["type"] == error_type
    assert body["error"]["field"] == field
    message = body["error"]["message"]
    assert isinstance(message, str) and message
    return message
