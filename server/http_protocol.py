"""uvicorn's httptools protocol with the limits a server facing real clients needs.

uvicorn alone holds a connection that never sends a request forever (its keep-alive timer starts only
after a first response), buffers a header line of any length, and counts no connections: 1,100 idle
sockets exhausted a 1,024 open-file limit, and ten clients streaming 50 MB header lines doubled the
server's memory. This protocol adds, per connection:

* a **request-head timeout**: a connection must complete its request head within
  ``request_head_timeout_s`` of opening, or of the first byte of a later request; else it is closed
  (a silent close when it sent nothing, like nginx and Go's ``ReadHeaderTimeout``; 408 otherwise);
* **head limits**: request line + headers over ``max_header_bytes`` or over ``max_headers`` fields get
  431, a request target over ``max_request_line_bytes`` gets 414; the connection is closed at once, so
  a flood costs at most one limit's worth of memory;
* a **connection cap**: at ``max_connections`` a new connection evicts the longest-idle one (open,
  with no request in progress), so idle sockets cannot lock out real clients; with none idle the new
  connection gets 503 and is closed.

Errors use the API's one body shape. Bodies are already bounded by ``BodyLimitMiddleware``.

It also tells the engine when a client goes away without a task per request: the connection's
``DisconnectWatch`` (in the ASGI scope under ``DISCONNECT_WATCH_KEY``) keeps the callbacks of its requests
waiting for the engine and calls them when the connection is lost; reading ``receive`` in a task for it
cost ~10 us a request. And it writes each response in one piece: uvicorn writes a response's head and
its body apart, two socket writes and two TCP segments per response; here the head is held and written
together with the first body bytes (or when the response completes without any, as a HEAD request's
does).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from server.api.errors import error_body_bytes
from server.api.state import DISCONNECT_WATCH_KEY

logger = logging.getLogger("exitserve.http")
RESERVED_FILE_DESCRIPTORS = 128  # model files, logs, torch and tokenizer threads, the listening socket


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may do before the server closes it (see the module docstring)."""

    request_head_timeout_s: float = 10.0
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    max_request_line_bytes: int = 8192
    max_connections: int = 1024


class _HeadRejected(Exception):
    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _ResponseWriter:
    """A connection's transport as its request cycles see it: each response's head (the first write
    after the previous response completed, never the interim ``100 Continue``) is held and goes out with
    the next write, or when the response completes without one. Pipelined requests run one after another,
    so at most one head is held at a time."""

    __slots__ = ("_head", "_head_seen", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head = b""
        self._head_seen = False

    def write(self, data: bytes) -> None:
        if not self._head_seen and data != _CONTINUE:
            self._head_seen = True
            self._head = data
            return
        if self._head:
            data, self._head = self._head + data, b""
        self._transport.write(data)

    def flush(self) -> None:
        if self._head:
            head, self._head = self._head, b""
            self._transport.write(head)

    def response_complete(self) -> None:
        self.flush()
        self._head_seen = False

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


class _ConnectionWatch:
    """A ``DisconnectWatch`` of one connection: the requests waiting on it are told, on the event loop,
    when it is lost (a request that starts watching after that is told at once)."""

    __slots__ = ("_loop", "_next_key", "_watchers", "lost")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._watchers: dict[int, Callable[[], None]] = {}
        self._next_key = 0
        self.lost = False

    def watch(self, on_gone: Callable[[], None]) -> Callable[[], None]:
        if self.lost:
            self._loop.call_soon(on_gone)
            return _nothing
        self._next_key += 1
        key = self._next_key
        self._watchers[key] = on_gone
        return partial(self._watchers.pop, key, None)  # type: ignore[return-value]

    def connection_lost(self) -> None:
        self.lost = True
        watchers, self._watchers = self._watchers, {}
        for on_gone in watchers.values():
            self._loop.call_soon(on_gone)


def _nothing() -> None:
    pass


def default_max_connections() -> int:
    """Raise the open-file soft limit to its hard limit (as nginx's worker_rlimit_nofile would), then
    allow as many connections as leave ``RESERVED_FILE_DESCRIPTORS`` free."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            logger.warning("could not raise the open-file limit from %d", soft)
    limit = 65536 if soft == resource.RLIM_INFINITY else soft
    return max(16, limit - RESERVED_FILE_DESCRIPTORS)


def protocol_class(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` enforcing ``limits``; one per server, since
    its connections share one table of idle connections (oldest first) for eviction at the cap."""
    idle: OrderedDict[HardenedHttpToolsProtocol, None] = OrderedDict()
    return type("ExitserveHttpProtocol", (HardenedHttpToolsProtocol,), {"limits": limits, "idle": idle})


class HardenedHttpToolsProtocol(HttpToolsProtocol):
    """Use through :func:`protocol_class`, which sets ``limits`` and ``idle``."""

    limits: ConnectionLimits
    idle: OrderedDict[HardenedHttpToolsProtocol, None]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = True  # reading a request head (or waiting for one): no request in progress
        self._head_bytes = 0  # bytes read while in the head (counts unterminated lines)
        self._head_size = 0  # bytes of complete header fields
        self._num_headers = 0
        self._rejected = False

    # --- connection lifecycle -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        at_cap = len(self.connections) >= self.limits.max_connections
        evicted = False
        if at_cap and self.idle:
            oldest = next(iter(self.idle))
            oldest._close_idle("evicted: connection cap reached")
            evicted = True
        super().connection_made(transport)
        self._writer = _ResponseWriter(transport)
        self._watch = _ConnectionWatch(self.loop)
        if at_cap and not evicted:  # every connection is busy with a request
            self._reject(503, "overloaded", "too many open connections; retry later")
            return
        self._arm_head_timer()
        self.idle[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._watch.connection_lost()
        self._cancel_head_timer()
        self.idle.pop(self, None)
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._writer.response_complete()  # a response with no body bytes (HEAD): its head goes now
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._in_head, self._head_bytes = True, 0
            self.idle[self] = None  # keep-alive: idle until the next request (uvicorn's timer runs)

    # --- reading -------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        self._unset_keepalive_if_required()
        if self._in_head and self._head_timer is None:  # first byte of a request after keep-alive
            self._arm_head_timer()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _HeadRejected):
                rejected = e.__context__
                self._reject(rejected.status, rejected.error_type, rejected.message)
                return
            self._reject(400, "bad_request", "invalid HTTP request")
            return
        except httptools.HttpParserUpgrade:  # as uvicorn does (no websocket routes here)
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self._reject(400, "bad_request", "invalid HTTP request")
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                message = f"request head over the {self.limits.max_header_bytes}-byte limit"
                self._reject(431, "request_header_fields_too_large", message)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._num_headers = 0
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_request_line_bytes:
            message = f"request target over the {self.limits.max_request_line_bytes}-byte limit"
            raise _HeadRejected(414, "uri_too_long", message)

    def on_header(self, name: bytes, value: bytes) -> None:
        # Exact accounting of complete fields (a whole head may arrive in one read); an unterminated
        # line is caught by the byte count in data_received.
        self._num_headers += 1
        self._head_size += len(name) + len(value) + 4
        if self._num_headers > self.limits.max_headers:
            message = f"more than {self.limits.max_headers} header fields"
            raise _HeadRejected(431, "request_header_fields_too_large", message)
        if self._head_size + len(self.url) > self.limits.max_header_bytes:
            message = f"request head over the {self.limits.max_header_bytes}-byte limit"
            raise _HeadRejected(431, "request_header_fields_too_large", message)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        self.idle.pop(self, None)
        self.scope[DISCONNECT_WATCH_KEY] = self._watch  # type: ignore[literal-required]
        super().on_headers_complete()
        # The cycle was just made; its ASGI task has not run yet (tasks start on a later loop turn).
        if self.cycle is not None:
            self.cycle.transport = self._writer  # type: ignore[assignment]

    # --- helpers -------------------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.request_head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_bytes == 0:
            self._close_idle("no request within the request-head timeout")
        else:
            message = f"request head not complete within {self.limits.request_head_timeout_s:g} s"
            self._reject(408, "request_timeout", message)

    def _close_idle(self, reason: str) -> None:
        logger.debug("closing connection from %s: %s", self.client, reason)
        self.idle.pop(self, None)
        self._cancel_head_timer()
        self.transport.close()

    def _reject(self, status: int, error_type: str, message: str) -> None:
        """Answer with the one error body and close: the rest of this connection's bytes are not read."""
        self._rejected = True
        self._cancel_head_timer()
        self.idle.pop(self, None)
        if self.transport.is_closing():
            return
        logger.info("refused a request head from %s: %d %s", self.client, status, message)
        self._writer.flush()  # a response in progress keeps its place before this one
        body = error_body_bytes(error_type, message)
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        if status == 503:
            head.insert(-1, b"retry-after: 1\r\n")
        self.transport.write(b"".join(head) + body)
        self.transport.close()
