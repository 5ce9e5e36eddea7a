"""The messages between front ends and the engine core, and the socket that carries them.

Front end -> core: ``Hello`` (a front end connects), ``AddRequest`` (token ids, already tokenized, and the
rows' resolved exit policy), ``AbortRequest`` (the client went away, or the front end gave up on it).
Core -> front end: ``Outputs`` (the requests of one front end that finished or failed in one step, batched)
and ``Status`` (readiness, the live default speed and accuracy guard, the predicted backlog; sent on hello,
on change, and every ``STATUS_INTERVAL_S`` as a heartbeat).

Transport: ZeroMQ (pyzmq) with msgpack frames (msgspec), as vLLM v1 feeds its ``EngineCore``. A ROUTER
socket in the core, one DEALER per front end: the core reads every front end from one socket, and replies
go to the front end that asked without any routing table of ours. The same code runs the core as a thread
(``inproc://``: no copy through the kernel) or as its own process (``ipc://``, a Unix socket). A DEALER
reconnects by itself when a restarted core binds the same address. Shared-memory rings (another common
choice) would save a copy per message, but messages here are small (token ids and a few probabilities) and
ZeroMQ gives framing, many writers, reconnection and blocking-with-timeout for free. msgspec decodes into
typed structs with no per-field Python code; pickle would be slower and would execute what it decodes.
"""

from __future__ import annotations

import contextlib
from array import array
from collections.abc import Sequence

import msgspec
import zmq

STATUS_INTERVAL_S = 0.25  # heartbeat: the core tells every front end its status at least this often

# Token ids travel as int32 bytes in native order (the front ends and the core share one host): msgpack
# carries bytes without a Python object per token, so the core (one thread for every front end) never
# converts ids one by one; it keeps them as ``array('i')`` and joins them into a batch by memcpy.
TOKEN_ID_TYPECODE = "i"
assert array(TOKEN_ID_TYPECODE).itemsize == 4


def pack_token_ids(ids: Sequence[int]) -> bytes:
    """A row's token ids as the bytes an ``AddRequest`` carries (front end side)."""
    return array(TOKEN_ID_TYPECODE, ids).tobytes()


def unpack_token_ids(data: bytes) -> array[int]:
    """The ids of ``pack_token_ids``, as an int32 array (no copy per token; core side)."""
    ids = array(TOKEN_ID_TYPECODE)
    ids.frombytes(data)
    return ids


class Hello(msgspec.Struct, tag=True, array_like=True):
    """A front end connected (or reconnected to a restarted core): send it the status now."""

    epoch: int


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    """One request's rows. ``epoch`` is the core generation the front end saw: a restarted core drops
    requests sent to its predecessor, whose futures the front end has already failed."""

    epoch: int
    request_id: int  # unique per front end
    token_ids: list[bytes]  # per row, ``pack_token_ids``
    criterion_code: int
    threshold: float  # native threshold of the criterion (model_store.criteria.threshold_for)
    max_layers: int  # clamped to the model's depth
    speed: float
    speed_is_default: bool
    deadline_s: float | None  # absolute time.monotonic(); the same clock in every process of one host
    best_effort: bool = False  # at the deadline, answer from the deepest ramp computed instead of 504
    drop_pts: float = 0.0  # the calibrated accuracy drop of the request's own setting (metrics)
    # Faster settings the request allows under overload, least degraded first:
    # (criterion code, native threshold, speed, calibrated drop in points, calibrated mean exit layer).
    levels: list[tuple[int, float, float, float, float]] = []


class AbortRequest(msgspec.Struct, tag=True, array_like=True):
    """Drop a request's rows; no reply is sent."""

    request_id: int


class Finished(msgspec.Struct, array_like=True):
    """A request whose every row exited: per row (label index, probabilities, exit layer, answered at
    the deadline from the deepest ramp computed)."""

    request_id: int
    rows: list[tuple[int, list[float], int, bool]]
    queue_time_s: float
    inference_time_s: float
    # Admitted at a degraded setting under overload: (criterion code, speed, calibrated drop in points).
    degraded: tuple[int, float, float] | None = None


class Failed(msgspec.Struct, array_like=True):
    """A request refused or failed by the core. ``kind`` names a class of ``server.engine.errors``."""

    request_id: int
    kind: str
    message: str
    retry_after_s: float = 0.0
    reason: str = ""


class AdmissionView(msgspec.Struct, array_like=True):
    """The core's admission model and the work ahead, as of one step: a front end refuses what the core
    would refuse (``admission.check_admission``) without waiting for the core to read its inbox."""

    ready: bool = False
    fixed_s: float = 0.0
    per_token_s: float = 0.0
    pad_ratio: float = 1.0
    correction: float = 1.0
    max_rows_per_step: int = 1
    max_tokens_per_step: int = 1
    row_layers: float = 0.0
    token_layers: float = 0.0
    chain_layers: float = 0.0
    backlog_s: float = 0.0


class Outputs(msgspec.Struct, tag=True, array_like=True):
    """What one step finished for one front end, and the admission view after it."""

    finished: list[Finished]
    failed: list[Failed]
    admission: AdmissionView | None = None


class Status(msgspec.Struct, tag=True, array_like=True):
    """The core's state as front ends need it. ``live_guard`` is None when unchanged since the last."""

    epoch: int
    ready: bool
    default_speed: float
    admission: AdmissionView
    depths: list[tuple[int, float, int, float]]  # (criterion code, threshold, max layers) -> mean depth
    live_guard: dict[str, object] | None = None


ToCore = Hello | AddRequest | AbortRequest
ToFrontEnd = Outputs | Status

_encoder = msgspec.msgpack.Encoder()
_to_core = msgspec.msgpack.Decoder(ToCore)  # type: ignore[arg-type]
_to_front_end = msgspec.msgpack.Decoder(ToFrontEnd)  # type: ignore[arg-type]


def encode(message: ToCore | ToFrontEnd) -> bytes:
    return _encoder.encode(message)


def decode_to_core(data: bytes) -> ToCore:
    return _to_core.decode(data)  # type: ignore[no-any-return]


def decode_to_front_end(data: bytes) -> ToFrontEnd:
    return _to_front_end.decode(data)  # type: ignore[no-any-return]


class CoreSocket:
    """The core's end: one ROUTER bound at ``address``; every message carries its front end's identity."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], address: str) -> None:
        self._socket = context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        # A front end that vanished must not make the core block or raise: its replies are dropped.
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._socket.bind(address)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)

    def receive(self, timeout_s: float | None) -> list[tuple[bytes, ToCore]]:
        """Every message waiting now; if none, wait up to ``timeout_s`` (None: forever) for the first."""
        received: list[tuple[bytes, ToCore]] = []
        while True:
            try:
                identity, *frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                if received or timeout_s == 0.0:
                    return received
                timeout_ms = None if timeout_s is None else max(1, int(timeout_s * 1000))
                if not self._poller.poll(timeout_ms):
                    return received
                timeout_s = 0.0
                continue
            for data in frames:  # a front end sends what one turn of its event loop queued, in order
                try:
                    received.append((identity, decode_to_core(data)))
                except msgspec.DecodeError:  # not from a front end of ours: ignored
                    continue

    def send(self, identity: bytes, message: ToFrontEnd) -> None:
        # A full queue means that front end is stuck or gone: its requests time out there.
        with contextlib.suppress(zmq.Again):
            self._socket.send_multipart((identity, encode(message)), zmq.NOBLOCK)

    def close(self) -> None:
        self._socket.close(linger=0)
