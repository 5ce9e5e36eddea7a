"""The front end's side of the engine: validation, tokenization, futures, and messages to the core.

One ``EngineClient`` per front-end process (or per in-process engine). It tokenizes its own requests, sends
``AddRequest`` and awaits one future per request; a reader callback on the event loop resolves the futures
from the core's batched ``Outputs``. Nothing here wakes on a timer per request: a disconnect is told by the
HTTP connection itself (``DisconnectWatch``; then an ``AbortRequest`` goes out), and deadlines are the
core's to check.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, replace
from functools import partial

import zmq

from model_store.policy import CRITERION_CODES, threshold_for
from model_store.tokens import RowTokenizer
from server.engine import errors
from server.engine.admission import Backlog, DepthModel, ServicePrediction, admit
from server.engine.errors import (
    DeadlineExceededError,
    EngineError,
    InvalidRequestError,
    NotReadyError,
    PayloadTooLargeError,
    QueueFullError,
    RequestCancelledError,
)
from server.engine.messages import (
    AbortRequest,
    AddRequest,
    AdmissionView,
    Failed,
    Hello,
    Outputs,
    Status,
    decode_to_front_end,
    encode,
    pack_token_ids,
)
from server.engine.types import (
    ClassifyOptions,
    ClassifyResult,
    DisconnectWatch,
    EngineConfig,
    EngineObserver,
    Inputs,
    ModelInfo,
    NullObserver,
    RowOutcome,
)

logger = logging.getLogger(__name__)

# Texts up to this many characters (all inputs of a request together) are tokenized on the event loop:
# a thread hop costs more than the Rust tokenizer needs for them (~10-60 us).
INLINE_TOKENIZE_CHARS = 16_384
# Up to this many, without releasing the GIL (``RowTokenizer``, ``hold_gil``): with the engine core as a
# thread of this process, each release made a short request wait for the GIL behind the core's step.
# Longer texts release it: holding it through a 2,000-character email starved the core thread (the
# ceiling run at 4,096: email 1,086 -> 916 req/s, HTTP vs core 90 % -> 66 %; at 1,024: 1,147 and 89 %).
HOLD_GIL_TOKENIZE_CHARS = 1_024
_ERROR_KINDS: dict[str, type[EngineError]] = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, EngineError)
}

CRITERIA = {code: criterion for criterion, code in CRITERION_CODES.items()}


@dataclass
class _Pending:
    future: asyncio.Future[ClassifyResult]
    options: ClassifyOptions
    truncated: list[bool]


class EngineClient:
    """Feeds one engine core; implements the ``ServingEngine`` contract of ``server/api/state.py``."""

    def __init__(
        self,
        info: ModelInfo,
        tokenizer: RowTokenizer,
        config: EngineConfig,
        observer: EngineObserver | None = None,
        num_peers: int = 1,
    ) -> None:
        self.config = config
        self._observer: EngineObserver = observer or NullObserver()
        # Front ends feeding the same core (this one included): each assumes the others sent as much as
        # it did since the core's last report, which it cannot see.
        self._num_peers = max(1, num_peers)
        self._static_info = info
        self._info = info
        self._tokenizer = tokenizer
        self._socket: zmq.Socket[bytes] | None = None
        self._outbox: list[bytes] = []  # encoded messages for the core, sent at the end of a loop turn
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._epoch = 0  # the core generation this client talks to; 0: none
        self._core_ready = False
        self._accepting = False
        # The core's admission model as of its last message, plus what this front end sent since.
        self._prediction = ServicePrediction()
        self._ahead = Backlog()
        self._sent = Backlog()
        self._depth = DepthModel()
        self._labels = list(info.labels)
        self._num_layers = info.num_layers
        table = info.calibration_table
        self._trust = None if table is None else table.agreement_table

    # --- connection ---------------------------------------------------------------------------------

    def connect(self, epoch: int, address: str, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        """Talk to core generation ``epoch`` at ``address`` from now on (start-up, or after a restart:
        whatever was in flight with the old core fails with 503)."""
        self._loop = asyncio.get_running_loop()
        self.fail_all(NotReadyError("engine restarting after a fault; retry"))
        if self._socket is not None:
            self._loop.remove_reader(self._fd)
            self._socket.close(linger=0)
        self._outbox = []  # for the old core, which is gone
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(address)
        self._socket = socket
        self._fd = int(socket.getsockopt(zmq.FD))
        self._epoch, self._core_ready = epoch, False
        self._loop.add_reader(self._fd, self._on_readable)
        self._accepting = True
        self._send(Hello(epoch))

    def core_down(self) -> None:
        """The core died or hung: fail what is in flight now, refuse until a new core is connected."""
        self._core_ready = False
        self.fail_all(NotReadyError("engine restarting after a fault; retry"))

    def close(self) -> None:
        self._accepting = False
        self._flush_outbox()  # what is still queued goes to the socket before it closes
        if self._socket is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._fd)
            self._socket.close(linger=0)
            self._socket = None

    def stop_accepting(self) -> None:
        self._accepting = False

    def fail_all(self, error: EngineError) -> None:
        """Answer every pending request with ``error`` and tell the core to drop their rows."""
        pending, self._pending = self._pending, {}
        for request_id, entry in pending.items():
            if not entry.future.done():
                entry.future.set_exception(error)
            if self._socket is not None and self._core_ready:
                self._send(AbortRequest(request_id))

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    @property
    def epoch(self) -> int:
        return self._epoch

    def is_ready(self) -> bool:
        return self._accepting and self._core_ready

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    # --- requests -----------------------------------------------------------------------------------

    async def classify(
        self,
        texts: Inputs,
        options: ClassifyOptions,
        disconnect: DisconnectWatch | None = None,
    ) -> ClassifyResult:
        """Classify ``texts``; raises an ``EngineError`` subclass on refusal, timeout or failure.

        ``disconnect``: tells when the client has gone away; the request's rows are then dropped.
        """
        if not self.is_ready():
            raise NotReadyError("engine is not ready")
        if not texts:
            raise InvalidRequestError("inputs must not be empty", field="inputs")
        if len(texts) > self.config.max_inputs_per_request:
            raise PayloadTooLargeError(
                f"{len(texts)} inputs exceed the limit of {self.config.max_inputs_per_request} per request"
            )
        info = self._info
        _check_input_kind(texts, info)
        max_layers = options.max_layers
        if max_layers is not None and max_layers < 1:
            raise InvalidRequestError("max_layers must be at least 1", field="max_layers")
        max_layers = min(max_layers or info.num_layers, info.num_layers)
        num_chars = sum(len(t) if isinstance(t, str) else len(t[0]) + len(t[1]) for t in texts)
        if num_chars <= HOLD_GIL_TOKENIZE_CHARS:
            encoded = self._tokenize(texts, hold_gil=True)
        elif num_chars <= INLINE_TOKENIZE_CHARS:
            encoded = self._tokenize(texts)
        else:
            encoded = await asyncio.to_thread(self._tokenize, texts)
        truncated = [t for _, t in encoded]
        if (self.config.strict_length or options.refuse_truncated) and any(truncated):
            index = truncated.index(True)
            raise PayloadTooLargeError(
                f"inputs[{index}] is longer than {info.max_seq_length} tokens and may not be truncated"
            )
        if not self.is_ready():  # the core went down while a thread tokenized
            raise NotReadyError("engine is not ready")
        criterion_code = CRITERION_CODES[options.criterion]
        threshold = threshold_for(options.criterion, options.speed, len(self._labels), self._num_layers)
        self._refuse_early(encoded, criterion_code, threshold, max_layers, options)
        loop = self._loop
        assert loop is not None
        request_id = next(self._ids)
        future: asyncio.Future[ClassifyResult] = loop.create_future()
        self._pending[request_id] = _Pending(future, options, truncated)
        self._send(
            AddRequest(
                epoch=self._epoch,
                request_id=request_id,
                token_ids=[pack_token_ids(ids) for ids, _ in encoded],
                criterion_code=criterion_code,
                threshold=threshold,
                max_layers=max_layers,
                speed=options.speed,
                speed_is_default=options.speed_is_default,
                deadline_s=options.deadline_s,
                best_effort=options.best_effort,
                drop_pts=options.drop_pts,
                levels=[
                    (v.criterion_code, v.threshold, v.speed, v.drop_pts, v.mean_exit_layer)
                    for v in options.degrade_levels
                ],
            )
        )
        if disconnect is None:
            return await future
        stop_watching = disconnect.watch(partial(self._client_gone, request_id))
        try:
            return await future
        finally:
            stop_watching()

    def _client_gone(self, request_id: int) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is None:
            return
        self._send(AbortRequest(request_id))
        if not entry.future.done():
            entry.future.set_exception(RequestCancelledError("client disconnected"))

    def _refuse_early(
        self,
        encoded: list[tuple[tuple[int, ...], bool]],
        criterion_code: int,
        threshold: float,
        max_layers: int,
        options: ClassifyOptions,
    ) -> None:
        """The core's admission check (degradation levels included), here, on the core's last reported
        model and backlog (plus what this front end sent since): an overloaded server refuses in the front
        end, at once and for almost no CPU, instead of after the core's current step. The core checks
        again with exact figures."""
        if not self._prediction.ready:
            return
        num_rows = len(encoded)
        mean_tokens = sum(len(ids) for ids, _ in encoded) / num_rows
        depth = self._depth
        levels = options.degrade_levels
        try:
            admitted = admit(
                self._prediction,
                self._ahead + _scaled(self._sent, self._num_peers),
                num_rows,
                mean_tokens,
                depth.expected_layers(criterion_code, threshold, max_layers),
                options.deadline_s,
                time.monotonic(),
                self.config.max_queue_wait_ms,
                levels=levels,
                level_layers=tuple(
                    depth.expected_layers(v.criterion_code, v.threshold, max_layers, v.mean_exit_layer)
                    for v in levels
                ),
                target_latency_s=None
                if self.config.target_latency_ms is None
                else self.config.target_latency_ms / 1000.0,
                best_effort=options.best_effort,
            )
        except QueueFullError as e:
            if options.best_effort and options.deadline_s is not None:
                # Only the core knows which rows ahead it will cut at their deadlines: it decides.
                self._sent = self._sent + Backlog.of_rows(num_rows, 1.0, mean_tokens)
                return
            self._observer.admission_refused(e.reason)
            raise
        except DeadlineExceededError:
            self._observer.admission_refused("deadline_unreachable")
            raise
        self._sent = self._sent + Backlog.of_rows(num_rows, admitted.expected_layers, mean_tokens)

    def _tokenize(self, texts: Inputs, hold_gil: bool = False) -> list[tuple[tuple[int, ...], bool]]:
        """Token ids per text; a text the tokenizer rejects is the client's error, named by index."""
        try:
            return self._tokenizer(texts, hold_gil=hold_gil)
        except Exception:
            for index, text in enumerate(texts):
                try:
                    self._tokenizer([text])  # type: ignore[list-item]
                except Exception as e:
                    raise InvalidRequestError(
                        f"inputs[{index}] cannot be tokenized ({type(e).__name__})", field=f"inputs[{index}]"
                    ) from None
            raise  # no single text fails alone: a server fault, not the client's

    # --- messages -----------------------------------------------------------------------------------

    def _send(self, message: Hello | AddRequest | AbortRequest) -> None:
        """Queue ``message`` for the core; what is queued goes out once per turn of the event loop, as
        one multipart message (one frame each, in order): every request a turn of the loop parsed costs
        one wake-up of ZeroMQ's I/O threads and one read in the core, not one each."""
        if self._socket is None:
            return
        self._outbox.append(encode(message))
        if len(self._outbox) == 1:
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon(self._flush_outbox)
            else:
                self._flush_outbox()

    def _flush_outbox(self) -> None:
        frames, self._outbox = self._outbox, []
        socket = self._socket
        if socket is None or not frames:
            return
        try:
            socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("engine core is not reading its inbox; %d message(s) dropped", len(frames))
        # A send may consume the socket's edge-triggered readiness: read what arrived meanwhile.
        if int(socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN and self._loop is not None:
            self._loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        socket = self._socket
        if socket is None:
            return
        while True:
            try:
                data = socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            message = decode_to_front_end(data)
            if isinstance(message, Outputs):
                self._on_outputs(message)
            else:
                self._on_status(message)

    def _on_status(self, status: Status) -> None:
        if status.epoch != self._epoch:
            return
        self._core_ready = status.ready
        self._on_admission(status.admission)
        self._depth.load(status.depths)
        info = self._info
        if status.live_guard is not None or status.default_speed != info.default_speed:
            self._info = replace(
                info,
                default_speed=status.default_speed,
                live_guard=status.live_guard if status.live_guard is not None else info.live_guard,
            )

    def _on_admission(self, view: AdmissionView) -> None:
        self._prediction = ServicePrediction(
            ready=view.ready,
            fixed_s=view.fixed_s,
            per_token_s=view.per_token_s,
            pad_ratio=view.pad_ratio,
            correction=view.correction,
            max_rows_per_step=view.max_rows_per_step,
            max_tokens_per_step=view.max_tokens_per_step,
        )
        self._ahead = Backlog(view.row_layers, view.token_layers, view.chain_layers)
        self._sent = Backlog()

    def _on_outputs(self, outputs: Outputs) -> None:
        if outputs.admission is not None:
            self._on_admission(outputs.admission)
        labels = self._labels
        info = self._info
        for done in outputs.finished:
            entry = self._pending.pop(done.request_id, None)
            if entry is None or entry.future.done():
                continue
            trust = self._trust
            rows = [
                RowOutcome(
                    label=labels[label_index],
                    label_index=label_index,
                    score=probs[label_index],
                    probs=probs,
                    exit_layer=exit_layer,
                    num_layers_run=exit_layer,
                    truncated=entry.truncated[i],
                    deadline_exit=deadline_exit,
                    full_depth_agreement=None
                    if trust is None
                    else trust.agreement(exit_layer, probs[label_index]),
                )
                for i, (label_index, probs, exit_layer, deadline_exit) in enumerate(done.rows)
            ]
            options = entry.options
            degraded = done.degraded
            entry.future.set_result(
                ClassifyResult(
                    rows=rows,
                    model=info.name,
                    version=info.version,
                    criterion=options.criterion if degraded is None else CRITERIA[degraded[0]],
                    speed=options.speed if degraded is None else degraded[1],
                    queue_time_s=done.queue_time_s,
                    inference_time_s=done.inference_time_s,
                    degraded=degraded is not None,
                    requested_criterion=None if degraded is None else options.criterion,
                    requested_speed=None if degraded is None else options.speed,
                    predicted_drop_pts=None if degraded is None else degraded[2],
                )
            )
        for failed in outputs.failed:
            entry = self._pending.pop(failed.request_id, None)
            if entry is not None and not entry.future.done():
                entry.future.set_exception(_error_of(failed))


def _scaled(backlog: Backlog, factor: int) -> Backlog:
    if factor == 1:
        return backlog
    return Backlog(backlog.row_layers * factor, backlog.token_layers * factor, backlog.chain_layers)


def _error_of(failed: Failed) -> EngineError:
    if failed.kind == "QueueFullError":
        return QueueFullError(failed.message, retry_after_s=failed.retry_after_s, reason=failed.reason)
    cls = _ERROR_KINDS.get(failed.kind, errors.BatchFailedError)
    return cls(failed.message)


def _check_input_kind(inputs: Inputs, info: ModelInfo) -> None:
    """A pair sent to a single-text model, or a text to a pair model, is refused (422) on every route."""
    pairs = bool(inputs) and isinstance(inputs[0], tuple)
    if pairs and info.input_kind != "pair":
        raise InvalidRequestError(
            f"inputs holds [text, text_pair] pairs, but model {info.name!r} takes single texts",
            field="inputs",
        )
    if not pairs and info.input_kind == "pair":
        raise InvalidRequestError(
            f"model {info.name!r} takes [text, text_pair] pairs; inputs holds single texts", field="inputs"
        )
