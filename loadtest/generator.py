"""The load generator: closed loop (fixed concurrency) or open loop (Poisson arrivals), always bounded
in request count and in time, against loopback URLs unless ``allow_remote`` (a user's own deployment:
``--allow-remote``, with its API key).

Every request sends ``inputs_per_request`` inputs of the dataset (request i sends examples from
i x inputs_per_request on, mod N) at one speed of the run's mix (drawn with the run's seeded RNG), on the
v1 route or the v2 (Open Inference Protocol) infer route, and records status, latency, predicted labels
and exit layers.
Open-loop latency runs from the *scheduled* send time, so a slow client or server cannot hide queueing
(no coordinated omission); the client's own lag is reported next to it.

Requests are httpx requests sent straight to ``LoopbackTransport`` connections (one keep-alive
connection per request in flight), not through ``httpx.AsyncClient``: on this 2-core machine the client's
bookkeeping (and, before it, httpcore's pool) cost more CPU per request than the server it measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import httpx

from loadtest.arrivals import poisson_arrival_times_s
from loadtest.dataset import Example
from loadtest.progress import Progress
from loadtest.safety import require_http, require_loopback
from loadtest.stats import RequestRecord, summarize, summarize_by_speed
from loadtest.transport import LoopbackTransport

Mode = Literal["closed", "open"]
Protocol = Literal["v1", "v2"]
CLASSIFY_PATH = "/v1/classify"
HEADERS = {"content-type": "application/json"}


@dataclass(frozen=True)
class LoadSettings:
    """One run. ``max_requests`` and ``max_duration_s`` both bound it; whichever comes first ends it."""

    url: str  # base URL of the server, e.g. http://127.0.0.1:8000
    mode: Mode = "closed"
    concurrency: int = 32  # closed loop: requests in flight; open loop: connection pool size
    rate_per_s: float | None = None  # open loop only
    max_requests: int = 1000
    max_duration_s: float = 30.0
    speeds: tuple[float | None, ...] = (None,)  # None = the server's default speed
    criterion: str | None = None
    max_accuracy_drop: float | None = None  # an accuracy target instead of a speed (points below full depth)
    seed: int = 0
    request_timeout_s: float = 30.0
    drain_timeout_s: float = 10.0  # after the time bound: how long in-flight requests may still finish
    num_warmup_requests: int = 0
    allow_remote: bool = False  # a non-loopback URL (a real deployment); off by default
    api_key: str | None = field(default=None, repr=False)  # sent as a bearer token; never written out
    inputs_per_request: int = 1
    protocol: Protocol = "v1"
    model: str | None = None  # v2: the model name in the route (default: asked from GET /v1/models)

    def __post_init__(self) -> None:
        if self.allow_remote:
            require_http(self.url)
        else:
            require_loopback(self.url)
        if self.inputs_per_request < 1:
            raise ValueError("inputs_per_request must be at least 1")
        if self.protocol not in ("v1", "v2"):
            raise ValueError(f"protocol must be 'v1' or 'v2', got {self.protocol!r}")
        if self.mode not in ("closed", "open"):
            raise ValueError(f"mode must be 'closed' or 'open', got {self.mode!r}")
        if self.mode == "open" and (self.rate_per_s is None or self.rate_per_s <= 0):
            raise ValueError("open loop needs a positive rate_per_s")
        if self.concurrency < 1 or self.max_requests < 1 or self.max_duration_s <= 0:
            raise ValueError("concurrency, max_requests and max_duration_s must be positive")
        if not self.speeds:
            raise ValueError("speeds must hold at least one value (None = server default)")
        for speed in self.speeds:
            if speed is not None and not 0.0 <= speed <= 1.0:
                raise ValueError(f"speed must be within [0, 1], got {speed}")


@dataclass
class RunResult:
    """The records of a run and its summary (``summary`` is what goes into the JSON report)."""

    settings: LoadSettings
    records: list[RequestRecord]
    duration_s: float
    summary: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"settings": public_settings(self.settings), "results": self.summary}


def public_settings(settings: LoadSettings) -> dict[str, Any]:
    """The settings as a report may show them: the API key is never written out."""
    shown = asdict(settings)
    shown["api_key"] = None if settings.api_key is None else "(set)"
    return shown


def _body(
    texts: str | list[str],
    speed: float | None,
    criterion: str | None,
    max_accuracy_drop: float | None = None,
    protocol: Protocol = "v1",
) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if speed is not None:
        options["speed"] = speed
    if criterion is not None:
        options["criterion"] = criterion
    if max_accuracy_drop is not None:
        options["max_accuracy_drop"] = max_accuracy_drop
    if protocol == "v2":
        data = [texts] if isinstance(texts, str) else texts
        tensor = {"name": "text", "shape": [len(data)], "datatype": "BYTES", "data": data}
        body: dict[str, Any] = {"inputs": [tensor]}
        if options:
            body["parameters"] = options
        return body
    return {"inputs": texts, **options}


def parse_reply(protocol: Protocol, reply: dict[str, Any]) -> tuple[list[str], list[int]]:
    """Labels and exit layers of a 200 reply, in input order."""
    if protocol == "v2":
        outputs = {o["name"]: o["data"] for o in reply["outputs"]}
        return [str(label) for label in outputs["label"]], [int(e) for e in outputs["exit_layer"]]
    results = reply["results"]
    return [str(r["label"]) for r in results], [int(r["exit_layer"]) for r in results]


class _Run:
    """State of one run in flight."""

    def __init__(
        self,
        settings: LoadSettings,
        examples: Sequence[Example],
        connections: Sequence[LoopbackTransport],
        progress: Progress,
    ) -> None:
        if not examples:
            raise ValueError("a run needs at least one example")
        self.settings = settings
        self.examples = examples
        self.idle_connections: asyncio.LifoQueue[LoopbackTransport] = asyncio.LifoQueue()
        for connection in connections:
            self.idle_connections.put_nowait(connection)
        path = CLASSIFY_PATH if settings.protocol == "v1" else f"/v2/models/{settings.model}/infer"
        self.classify_url = httpx.URL(settings.url.rstrip("/") + path)
        self.headers = dict(HEADERS)
        if settings.api_key is not None:
            self.headers["authorization"] = f"Bearer {settings.api_key}"
        self.progress = progress
        self._speed_rng = random.Random(settings.seed)
        self._speeds_drawn: list[float | None] = []
        self.records: list[RequestRecord] = []
        self.started_at = 0.0
        self._bodies: dict[tuple[int, float | None], bytes] = {}
        # (criterion, speed) the server reports having used, per answered request
        self.settings_used: Counter[tuple[str, float]] = Counter()

    def speed_of(self, index: int) -> float | None:
        """Request ``index``'s speed: the i-th seeded draw from the mix, whatever order requests go in."""
        while len(self._speeds_drawn) <= index:
            self._speeds_drawn.append(self._speed_rng.choice(self.settings.speeds))
        return self._speeds_drawn[index]

    def example_indices(self, example_index: int) -> list[int]:
        """The examples one request sends, from ``example_index`` on."""
        n = self.settings.inputs_per_request
        return [(example_index + k) % len(self.examples) for k in range(n)]

    def body_of(self, example_index: int, speed: float | None) -> bytes:
        """The request body, encoded once per (example, speed): the client's CPU is the server's too."""
        key = (example_index, speed)
        body = self._bodies.get(key)
        if body is None:
            texts: str | list[str] = [self.examples[i].text for i in self.example_indices(example_index)]
            if self.settings.inputs_per_request == 1 and self.settings.protocol == "v1":
                texts = texts[0]
            s = self.settings
            body = json.dumps(_body(texts, speed, s.criterion, s.max_accuracy_drop, s.protocol)).encode()
            self._bodies[key] = body
        return body

    async def send(self, index: int, scheduled_at: float) -> None:
        example_index = (index * self.settings.inputs_per_request) % len(self.examples)
        example = self.examples[example_index]
        speed = self.speed_of(index)
        status, predicted, exit_layer = "cancelled", None, None
        labels: list[str] = []
        exit_layers: list[int] = []
        connection: LoopbackTransport | None = None
        sent_at = time.perf_counter()
        try:
            # Open loop: waiting for a free connection is client lag, and counts in the latency.
            connection = await self.idle_connections.get()
            sent_at = time.perf_counter()
            reply = await connection.handle_async_request(
                httpx.Request(
                    "POST",
                    self.classify_url,
                    content=self.body_of(example_index, speed),
                    headers=self.headers,
                )
            )
            status = str(reply.status_code)
            if reply.status_code == 200:
                reply_body = json.loads(reply.content)
                labels, exit_layers = parse_reply(self.settings.protocol, reply_body)
                predicted, exit_layer = labels[0], exit_layers[0]
                used = reply_body.get("parameters", reply_body)  # v2 names them in its parameters
                if "criterion" in used and "speed" in used:  # what the server says it used
                    self.settings_used[(str(used["criterion"]), float(used["speed"]))] += 1
        except httpx.HTTPError as e:
            status = f"transport:{type(e).__name__}"
        except (ValueError, KeyError, IndexError, TypeError):
            status = "bad_reply"  # 200 with a body that does not follow the API contract
        finally:
            latency_s = time.perf_counter() - scheduled_at
            if connection is not None:
                self.idle_connections.put_nowait(connection)
            expected = [self.examples[i].label for i in self.example_indices(example_index)]
            scored = [(e, p) for e, p in zip(expected, labels, strict=False) if e is not None]
            record = RequestRecord(
                index=index,
                example_index=example_index,
                speed=speed,
                scheduled_s=scheduled_at - self.started_at,
                sent_s=sent_at - self.started_at,
                latency_s=latency_s,
                status=status,
                expected_label=example.label,
                predicted_label=predicted,
                exit_layer=exit_layer,
                num_inputs=self.settings.inputs_per_request,
                num_correct=sum(e == p for e, p in scored) if labels else None,
                num_labelled=len(scored),
                exit_layers=tuple(exit_layers),
            )
            self.records.append(record)
            self.progress.record(record.ok, latency_s)

    async def closed_loop(self, deadline: float) -> list[asyncio.Task[None]]:
        next_index = iter(range(self.settings.max_requests))

        async def worker() -> None:
            for index in next_index:  # shared iterator: each index goes to exactly one worker
                now = time.perf_counter()
                if now >= deadline:
                    return
                await self.send(index, now)

        return [asyncio.create_task(worker()) for _ in range(self.settings.concurrency)]

    async def open_loop(self, deadline: float) -> list[asyncio.Task[None]]:
        assert self.settings.rate_per_s is not None
        arrivals_s = poisson_arrival_times_s(
            self.settings.rate_per_s, self.settings.max_requests, random.Random(self.settings.seed + 1)
        )
        tasks = []
        for index, arrival_s in enumerate(arrivals_s):
            due = self.started_at + arrival_s
            if due >= deadline:
                break
            delay_s = due - time.perf_counter()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            tasks.append(asyncio.create_task(self.send(index, due)))
        return tasks


async def run_load(
    settings: LoadSettings, examples: Sequence[Example], progress: Progress | None = None
) -> RunResult:
    """Run ``settings`` against its URL and return the records and their summary."""
    if settings.protocol == "v2" and settings.model is None:
        settings = replace(settings, model=await _served_model(settings))
    progress = progress or Progress("run", settings.max_requests, settings.max_duration_s)
    async with contextlib.AsyncExitStack() as stack:
        connections = [
            await stack.enter_async_context(LoopbackTransport(timeout_s=settings.request_timeout_s))
            for _ in range(settings.concurrency)
        ]
        run = _Run(settings, examples, connections, progress)
        for index in range(settings.num_warmup_requests):
            body = run.body_of(index % len(examples), settings.speeds[0])
            request = httpx.Request("POST", run.classify_url, content=body, headers=run.headers)
            await connections[index % len(connections)].handle_async_request(request)
        display = asyncio.create_task(progress.run_display())
        run.started_at = progress.started_at = time.perf_counter()
        cpu_started_s = time.process_time()
        deadline = run.started_at + settings.max_duration_s
        if settings.mode == "closed":
            tasks = await run.closed_loop(deadline)
        else:
            tasks = await run.open_loop(deadline)
        if tasks:
            remaining_s = max(deadline - time.perf_counter(), 0.0) + settings.drain_timeout_s
            done, pending = await asyncio.wait(tasks, timeout=remaining_s)
            for task in pending:  # past the time bound: give up on them (recorded as "cancelled")
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                task.result()  # a bug in the generator itself must fail the run, not look like a timeout
        # The run lasts until its last reply (latency runs from the scheduled time).
        duration_s = max((r.scheduled_s + r.latency_s for r in run.records), default=0.0)
        client_cpu_s = time.process_time() - cpu_started_s
        display.cancel()
        await asyncio.gather(display, return_exceptions=True)
    records = sorted(run.records, key=lambda r: r.index)
    summary = summarize(records, duration_s)
    # The generator shares the machine with the server: its own CPU use bounds what it can measure.
    summary["client_cpu_s"] = client_cpu_s
    summary["client_cpu_ms_per_request"] = client_cpu_s * 1000.0 / len(records) if records else None
    if len(settings.speeds) > 1:
        summary["per_speed"] = summarize_by_speed(records, duration_s)
    summary["settings_used"] = [
        {"criterion": criterion, "speed": speed, "num_requests": n}
        for (criterion, speed), n in sorted(run.settings_used.items())
    ]
    return RunResult(settings=settings, records=records, duration_s=duration_s, summary=summary)


async def _served_model(settings: LoadSettings) -> str:
    """The model a server serves (``GET /v1/models``), for the v2 route's path."""
    async with LoopbackTransport(timeout_s=settings.request_timeout_s) as connection:
        headers = {} if settings.api_key is None else {"authorization": f"Bearer {settings.api_key}"}
        request = httpx.Request("GET", settings.url.rstrip("/") + "/v1/models", headers=headers)
        reply = await connection.handle_async_request(request)
    if reply.status_code != 200:
        raise ValueError(f"GET /v1/models answered {reply.status_code}; pass the model name")
    return str(json.loads(reply.content)["models"][0]["name"])


def run_load_sync(
    settings: LoadSettings, examples: Sequence[Example], progress: Progress | None = None
) -> RunResult:
    """``run_load`` on a fresh event loop (uvloop when installed: less client CPU per request).

    SIGINT and SIGTERM stop the run and raise ``KeyboardInterrupt``, so callers' ``finally`` blocks
    (which stop the servers a benchmark started) run.
    """
    loop_factory: Callable[[], asyncio.AbstractEventLoop]
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        loop_factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        try:
            return runner.run(_interruptible(run_load(settings, examples, progress)))
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None


async def _interruptible(run: Coroutine[Any, Any, RunResult]) -> RunResult:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await run
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
