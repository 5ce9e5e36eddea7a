"""server/http_protocol.py's response writer (one socket write per response, in order) and connection
watch (the requests waiting on a connection are told when it is lost, with no task per request)."""

from __future__ import annotations

import asyncio
from typing import cast

from server.http_protocol import _CONTINUE, _ConnectionWatch, _ResponseWriter


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def _writer() -> tuple[_ResponseWriter, _Transport]:
    transport = _Transport()
    return _ResponseWriter(cast(asyncio.Transport, transport)), transport


def test_a_head_goes_out_with_the_first_body_bytes() -> None:
    writer, transport = _writer()
    writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.writes == []
    writer.write(b"{}")
    writer.write(b"more")  # later body bytes go as they come
    writer.response_complete()
    assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}", b"more"]


def test_each_response_of_a_connection_is_held_anew() -> None:
    writer, transport = _writer()
    for body in (b"a", b"b"):
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        writer.write(body)
        writer.response_complete()
    assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\na", b"HTTP/1.1 200 OK\r\n\r\nb"]


def test_a_response_without_body_bytes_is_written_when_it_completes() -> None:
    writer, transport = _writer()
    writer.write(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 83\r\n\r\n")  # HEAD: no body
    assert transport.writes == []
    writer.response_complete()
    assert transport.writes == [b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 83\r\n\r\n"]


def test_100_continue_is_never_held() -> None:
    writer, transport = _writer()
    writer.write(_CONTINUE)
    assert transport.writes == [_CONTINUE]
    writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
    writer.write(b"{}")
    assert transport.writes == [_CONTINUE, b"HTTP/1.1 200 OK\r\n\r\n{}"]


def test_close_and_flush_write_a_held_head_first() -> None:
    writer, transport = _writer()
    writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
    writer.close()
    assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\n"] and transport.closed and writer.is_closing()
    writer, transport = _writer()
    writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
    writer.flush()
    writer.flush()
    assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\n"]


async def test_the_requests_watching_a_lost_connection_are_told_once() -> None:
    watch = _ConnectionWatch(asyncio.get_running_loop())
    told: list[str] = []
    watch.watch(lambda: told.append("a"))
    stop_b = watch.watch(lambda: told.append("b"))
    stop_c = watch.watch(lambda: told.append("c"))
    stop_b()  # answered: it stops watching
    stop_b()  # twice is harmless
    watch.connection_lost()
    assert told == []  # on the event loop, not inside connection_lost
    await asyncio.sleep(0)
    assert told == ["a", "c"]
    stop_c()  # after the loss: nothing left to stop, nothing happens
    watch.connection_lost()
    await asyncio.sleep(0)
    assert told == ["a", "c"]


async def test_a_request_that_watches_after_the_loss_is_told_at_once() -> None:
    watch = _ConnectionWatch(asyncio.get_running_loop())
    watch.connection_lost()
    told: list[int] = []
    stop = watch.watch(lambda: told.append(1))
    await asyncio.sleep(0)
    assert told == [1]
    stop()
