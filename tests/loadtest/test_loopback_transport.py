"""The lean keep-alive transport: replies by length or chunks, reconnects, maps errors to httpx's."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from loadtest.servers import free_port
from loadtest.transport import LoopbackTransport


async def test_keep_alive_chunked_and_reconnect(server) -> None:
    async with LoopbackTransport(timeout_s=5.0) as transport:
        body = b'{"inputs": "spam spam"}'
        headers = {"content-type": "application/json"}
        for _ in range(3):  # the same connection, kept alive
            reply = await transport.handle_async_request(
                httpx.Request("POST", f"{server.url}/v1/classify", content=body, headers=headers)
            )
            assert reply.status_code == 200
            assert reply.json()["results"][0]["label"] == "spam"
        chunked = await transport.handle_async_request(httpx.Request("GET", f"{server.url}/chunked"))
        assert chunked.content == b'{"a": 1}'
        closed = await transport.handle_async_request(httpx.Request("GET", f"{server.url}/close"))
        assert closed.content == b"bye"
        again = await transport.handle_async_request(httpx.Request("GET", f"{server.url}/readyz"))
        assert again.json() == {"status": "ready"}  # a new connection after the server closed one
    assert len(server.bodies) == 3


async def test_errors_are_httpx_errors(server) -> None:
    async with LoopbackTransport(timeout_s=5.0) as transport:
        with pytest.raises(httpx.ConnectError):
            await transport.handle_async_request(httpx.Request("GET", f"http://127.0.0.1:{free_port()}/"))
    async with LoopbackTransport(timeout_s=0.1) as transport:
        request = httpx.Request("POST", f"{server.url}/v1/classify", json={"inputs": "sleep:1 x"})
        with pytest.raises(httpx.ReadTimeout):
            await transport.handle_async_request(request)


async def test_a_connection_the_server_closed_while_idle_is_replaced(server) -> None:
    async with LoopbackTransport(timeout_s=5.0) as transport:
        first = await transport.handle_async_request(httpx.Request("GET", f"{server.url}/readyz"))
        assert first.status_code == 200
        await asyncio.sleep(1.6)  # past the fake server's 1 s keep-alive timeout: it closed the socket
        second = await transport.handle_async_request(
            httpx.Request("POST", f"{server.url}/v1/classify", json={"inputs": "spam"})
        )
        assert second.status_code == 200
    assert len(server.bodies) == 1  # sent once on the new connection, never twice
