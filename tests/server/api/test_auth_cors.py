"""API key (off unless configured; Bearer or X-API-Key; open paths) and CORS (off unless configured)."""

from __future__ import annotations

import pytest

from tests.server.api.conftest import Served, assert_error, make_settings, serve

KEY = "s3cret-key"


async def test_auth_off_by_default(served: Served) -> None:
    assert (await served.client.post("/v1/classify", json={"inputs": "hi"})).status_code == 200


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": f"Basic {KEY}"}, 401),
        ({"X-API-Key": KEY + "x"}, 401),
        ({"Authorization": f"Bearer {KEY}"}, 200),
        ({"Authorization": f"bearer {KEY}"}, 200),
        ({"X-API-Key": KEY}, 200),
    ],
)
async def test_auth_on(headers: dict[str, str], status: int) -> None:
    async with serve(make_settings(api_key=KEY)) as s:
        response = await s.client.post("/v1/classify", json={"inputs": "hi"}, headers=headers)
        if status == 401:
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
            assert s.engine.calls == []
        else:
            assert response.status_code == 200, response.text


async def test_open_paths_default_and_configurable() -> None:
    async with serve(make_settings(api_key=KEY)) as s:
        for path in ["/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"]:
            assert (await s.client.get(path)).status_code == 200, path
        for path in ["/v1/models", "/v2/models/fake", "/openapi.json"]:
            assert_error(await s.client.get(path), 401, "unauthorized")
    async with serve(make_settings(api_key=KEY, open_paths="/healthz,/v1/models")) as s:
        assert (await s.client.get("/v1/models")).status_code == 200
        assert_error(await s.client.get("/metrics"), 401, "unauthorized")


async def test_cors_off_unless_configured(served: Served) -> None:
    response = await served.client.get("/healthz", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in response.headers


async def test_cors_configured() -> None:
    async with serve(make_settings(cors_origins="https://app.example", api_key=KEY)) as s:
        preflight = await s.client.options(
            "/v1/classify",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        response = await s.client.post(
            "/v1/classify", json={"inputs": "hi"}, headers={"Origin": "https://app.example", "X-API-Key": KEY}
        )
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert "X-Queue-Time-Ms" in response.headers["access-control-expose-headers"]
        other = await s.client.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
