"""A lean HTTP/1.1 keep-alive transport for httpx, for loopback load generation.

httpx's default transport (httpcore over anyio) spent ~1.2 ms of CPU per request on this 2-core machine,
15 times a bare asyncio client: the load generator, not the server, set the ceiling, and it took that CPU
from the server it measured. This transport keeps httpx's API (requests, responses, timeouts) and speaks
just enough HTTP/1.1 to one host over one kept-alive asyncio connection: ``Content-Length`` or chunked
replies, reconnect when the server closes, TLS for an https target (a remote deployment, allowed
explicitly). It is not a general-purpose client (no proxies, no HTTP/2, no 1xx).
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx

_MAX_HEAD_BYTES = 64 * 1024


class LoopbackTransport(httpx.AsyncBaseTransport):
    """One keep-alive connection; requests on it are sent one at a time (a lock orders them)."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        async with self._lock:
            try:
                return await asyncio.wait_for(self._exchange(request), self.timeout_s)
            except TimeoutError:
                await self._close()
                raise httpx.ReadTimeout(f"no reply within {self.timeout_s:g} s", request=request) from None
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                await self._close()
                if isinstance(e, ConnectionRefusedError):
                    raise httpx.ConnectError(str(e), request=request) from None
                raise httpx.RemoteProtocolError(f"{type(e).__name__}: {e}", request=request) from None

    async def _exchange(self, request: httpx.Request) -> httpx.Response:
        reused = self._writer is not None and not self._writer.is_closing()
        if not reused:
            await self._connect(request)
        try:
            return await self._send_and_receive(request)
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            # A kept-alive connection the server closed while idle (uvicorn: after 5 s) fails before any
            # reply byte: send once more on a fresh connection. Anything else is the server's answer.
            if not reused or (isinstance(e, asyncio.IncompleteReadError) and e.partial):
                raise
            await self._close()
            await self._connect(request)
            return await self._send_and_receive(request)

    async def _connect(self, request: httpx.Request) -> None:
        tls = request.url.scheme == "https"
        port = request.url.port or (443 if tls else 80)
        self._reader, self._writer = await asyncio.open_connection(
            request.url.host, port, ssl=tls or None, server_hostname=request.url.host if tls else None
        )

    async def _send_and_receive(self, request: httpx.Request) -> httpx.Response:
        assert self._reader is not None and self._writer is not None
        body = request.read()
        target = request.url.raw_path.decode("ascii")
        lines = [f"{request.method} {target} HTTP/1.1"]
        lines += [
            f"{name.decode('latin-1')}: {value.decode('latin-1')}" for name, value in request.headers.raw
        ]
        if body and "content-length" not in request.headers:
            lines.append(f"Content-Length: {len(body)}")
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await self._writer.drain()
        status, headers = await self._read_head(self._reader)
        content = await self._read_body(self._reader, headers)
        if any(k == "connection" and v.lower() == "close" for k, v in headers):
            await self._close()
        return httpx.Response(status, headers=headers, content=content, request=request)

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> tuple[int, list[tuple[str, str]]]:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > _MAX_HEAD_BYTES:
            raise ValueError("response head too large")
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = []
        for line in header_lines:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        return status, headers

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, headers: list[tuple[str, str]]) -> bytes:
        fields = dict(headers)
        if "content-length" in fields:
            return await reader.readexactly(int(fields["content-length"]))
        if fields.get("transfer-encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers are expected on loopback replies
                    return b"".join(chunks)
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
        raise ValueError("reply has neither Content-Length nor chunked encoding")

    async def _close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def aclose(self) -> None:
        await self._close()
