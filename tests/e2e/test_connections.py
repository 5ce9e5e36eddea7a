"""Connection hardening against a real server process: idle, slow and flooding clients cannot hold
descriptors or memory, and normal requests keep being served (server/http_protocol.py)."""

from __future__ import annotations

import re
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from model_store.store import ModelStore
from tests.e2e.conftest import ServerProcess, start_server

HEAD_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def hardened(
    tiny_store: ModelStore, tmp_path_factory: pytest.TempPathFactory, frontends: int
) -> Iterator[ServerProcess]:
    running = start_server(
        tiny_store.root,
        tmp_path_factory.mktemp("log") / "server.log",
        "--request-head-timeout-s", str(HEAD_TIMEOUT_S), "--max-connections", "64",
        frontends=frontends,
    )  # fmt: skip
    yield running
    running.terminate()


def _connect(server: ServerProcess) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_reply(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_idle_connection_is_closed_after_the_head_timeout(hardened: ServerProcess) -> None:
    with _connect(hardened) as sock:
        started = time.monotonic()
        assert _read_reply(sock) == b""  # closed without a word: it never asked anything
        assert HEAD_TIMEOUT_S - 0.1 <= time.monotonic() - started < HEAD_TIMEOUT_S + 2


def test_slow_request_head_gets_408_after_the_timeout(hardened: ServerProcess) -> None:
    with _connect(hardened) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
        started = time.monotonic()
        reply = _read_reply(sock)
        assert _status(reply) == 408 and b'"request_timeout"' in reply
        assert time.monotonic() - started < HEAD_TIMEOUT_S + 2


@pytest.mark.parametrize(
    ("head", "status", "error_type"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, b"uri_too_long"),
        (
            b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n",
            431,
            b"request_header_fields_too_large",
        ),
        (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n", 431, b"request_header"),
    ],
)
def test_oversized_heads_are_refused_and_closed(
    hardened: ServerProcess, head: bytes, status: int, error_type: bytes
) -> None:
    with _connect(hardened) as sock:
        sock.sendall(head)
        reply = _read_reply(sock)
        assert _status(reply) == status and error_type in reply
        assert b"connection: close" in reply.lower()


def test_unterminated_header_flood_is_cut_at_the_limit(hardened: ServerProcess) -> None:
    with _connect(hardened) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Flood: ")
        sent = 0
        with pytest.raises(OSError):  # the server closes long before 50 MB
            while sent < 50 * 2**20:
                sock.sendall(b"a" * 65536)
                sent += 65536
        assert sent < 4 * 2**20


def test_idle_connections_past_the_cap_evict_the_oldest_and_requests_still_pass(
    hardened: ServerProcess,
) -> None:
    idle = [_connect(hardened) for _ in range(100)]  # over the cap of 64
    time.sleep(0.2)
    with httpx.Client(base_url=hardened.base_url, timeout=5) as client:
        for _ in range(5):
            response = client.post("/v1/classify", json={"inputs": "hello"})
            assert response.status_code == 200, response.text
    # The oldest idle sockets were closed to make room; the newest are still open.
    idle[0].settimeout(2)
    assert idle[0].recv(1) == b""
    for sock in idle:
        sock.close()


def test_default_cap_survives_more_idle_sockets_than_the_open_file_limit(
    tiny_store: ModelStore, tmp_path: Path, frontends: int
) -> None:
    """The red-team case: a 1,024 open-file limit and 1,100 idle sockets. The server raises its soft
    limit where the hard limit allows; here both are 1,024, so the cap itself must protect it."""

    def low_file_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    server = start_server(
        tiny_store.root, tmp_path / "server.log", preexec_fn=low_file_limit, frontends=frontends
    )
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 1300:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
        idle = [_connect(server) for _ in range(1100)]
        with httpx.Client(base_url=server.base_url, timeout=5) as client:
            for _ in range(5):
                response = client.post("/v1/classify", json={"inputs": "hello"})
                assert response.status_code == 200, response.text
        for sock in idle:
            sock.close()
        assert "Too many open files" not in server.log()
    finally:
        assert server.terminate() == 0


def test_pipelined_requests_are_answered_in_order_with_one_write_per_response(
    hardened: ServerProcess,
) -> None:
    """Each response's head is held and written with its body (server/http_protocol.py): a HEAD
    response (no body bytes), an interim 100 Continue and pipelined requests must still come out
    whole and in order."""
    body = b'{"inputs": ["hello there"]}'
    with _connect(hardened) as sock:
        sock.sendall(
            b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            b"GET /no-such-route HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (len(body), body)
        )
        reply = _read_reply(sock)
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)]
    assert statuses == [200, 405, 200, 404], reply
    assert reply.count(b'{"status":"ready"}') == 1 and b'"exit_layer"' in reply and b'"not_found"' in reply
    with _connect(hardened) as sock:  # Expect: 100-continue gets its interim answer before the body
        sock.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        assert sock.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        reply = _read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and b'"exit_layer"' in reply
