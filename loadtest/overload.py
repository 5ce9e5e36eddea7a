"""``python -m loadtest overload``: goodput under sustained overload, with the server's default settings.

One run, one server (started here with nothing but ``--store``/``--model``, as ``make serve`` does, or
a running one with ``--url``):

1. **capacity**: closed loop, speed 0 (full depth), ``capacity_concurrency`` requests in flight, each
   with a 60 s deadline (so the server's queue-wait bound for deadline-less requests does not refuse
   the closed loop's own queue: capacity is what the engine computes, not what admission lets in);
2. per load factor and deadline mode: **open loop** (Poisson arrivals) at ``factor x capacity`` for
   ``duration_s``, every request at speed 0 with ``deadline_ms`` (or none), then at once
   ``recovery_factor x capacity`` for ``recovery_s`` while the overload's stragglers finish: how soon
   the server answers normal load normally again.

Reported per scenario: goodput (200 within the deadline, measured by the client from the scheduled
send time, so client lag counts), refusals (429/503) with their latency and whether they carried
``Retry-After``, 504s, lost requests (no HTTP answer within the client timeout), latency percentiles,
and recovery. Texts are the SpamAssassin test split cut to their first ``num_words`` words.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.arrivals import poisson_arrival_times_s
from loadtest.dataset import load_split
from loadtest.machine import git_commit, machine_info, now_iso
from loadtest.servers import ServerSpec, running
from loadtest.stats import percentile
from loadtest.transport import LoopbackTransport

HEADERS = {"content-type": "application/json"}
CAPACITY_DEADLINE_MS = 60_000
REFUSALS = ("429", "503")


@dataclass(frozen=True)
class OverloadOptions:
    """One overload run (see the module docstring)."""

    store: Path = Path("store")
    model: str = "spam-minilm"
    url: str | None = None  # a running server instead of starting one
    out_dir: Path = Path("bench-out")
    factors: tuple[float, ...] = (1.2, 1.5, 2.0)
    deadline_modes: tuple[int | None, ...] = (1000, None)  # deadline_ms per request; None = no deadline
    duration_s: float = 60.0
    capacity_s: float = 15.0
    capacity_concurrency: int = 64
    recovery_s: float = 5.0
    recovery_factor: float = 0.7  # load after the overload, x capacity
    num_words: int = 40
    client_timeout_s: float = 10.0
    max_connections: int = 1024
    server_args: tuple[str, ...] = ()  # extra server flags (none: the defaults under test)
    seed: int = 0
    # Measure the capacity again at the end (how far it moved on a shared machine); a test that reads
    # only the first measurement saves the time.
    capacity_after: bool = True


@dataclass(frozen=True)
class Outcome:
    """One request: when it was due and answered (s from the phase start), and how."""

    scheduled_s: float
    done_s: float
    status: str  # HTTP status, or "lost:<error>"
    retry_after: bool = False
    server_s: float | None = None  # the server's own X-Total-Time-Ms: the client's lag left out

    @property
    def latency_s(self) -> float:
        return self.done_s - self.scheduled_s


@dataclass
class Scenario:
    factor: float
    deadline_ms: int | None
    offered_rps: float
    overload: list[Outcome] = field(default_factory=list)
    recovery: list[Outcome] = field(default_factory=list)


class Client:
    """A pool of keep-alive loopback connections; waiting for a free one counts in the latency."""

    def __init__(self, url: str, num_connections: int, timeout_s: float) -> None:
        self.url = httpx.URL(url.rstrip("/") + "/v1/classify")
        self._pool: asyncio.LifoQueue[LoopbackTransport] = asyncio.LifoQueue()
        self._all = [LoopbackTransport(timeout_s=timeout_s) for _ in range(num_connections)]
        for connection in self._all:
            self._pool.put_nowait(connection)

    async def close(self) -> None:
        for connection in self._all:
            await connection.aclose()

    async def send(self, body: bytes, scheduled_at: float, phase_start: float) -> Outcome:
        connection = await self._pool.get()
        try:
            reply = await connection.handle_async_request(
                httpx.Request("POST", self.url, content=body, headers=HEADERS)
            )
            status, retry_after = str(reply.status_code), "retry-after" in reply.headers
            total_ms = reply.headers.get("x-total-time-ms")
            server_s = float(total_ms) / 1000.0 if total_ms is not None else None
        except httpx.HTTPError as e:
            status, retry_after, server_s = f"lost:{type(e).__name__}", False, None
        finally:
            self._pool.put_nowait(connection)
        done_s = time.perf_counter() - phase_start
        return Outcome(scheduled_at - phase_start, done_s, status, retry_after, server_s)


def bodies(texts: Sequence[str], deadline_ms: int | None) -> list[bytes]:
    """Request bodies at full depth (speed 0), with the deadline when given."""
    out = []
    for text in texts:
        body: dict[str, Any] = {"inputs": text, "speed": 0.0}
        if deadline_ms is not None:
            body["deadline_ms"] = deadline_ms
        out.append(json.dumps(body).encode())
    return out


async def closed_loop(
    client: Client, requests: Sequence[bytes], concurrency: int, duration_s: float, phase_start: float
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    stop_at = phase_start + duration_s
    counter = iter(range(10**9))

    async def worker() -> None:
        for i in counter:
            now = time.perf_counter()
            if now >= stop_at:
                return
            outcomes.append(await client.send(requests[i % len(requests)], now, phase_start))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


async def open_loop(
    client: Client, requests: Sequence[bytes], rate_per_s: float, duration_s: float, seed: int
) -> tuple[list[asyncio.Task[Outcome]], float]:
    """Schedule Poisson arrivals for ``duration_s``; returns the request tasks and the phase start."""
    num_arrivals = int(rate_per_s * duration_s * 2) + 10
    arrivals_s = poisson_arrival_times_s(rate_per_s, num_arrivals, random.Random(seed))
    phase_start = time.perf_counter()
    tasks = []
    for i, arrival_s in enumerate(arrivals_s):
        if arrival_s >= duration_s:
            break
        due = phase_start + arrival_s
        delay_s = due - time.perf_counter()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        tasks.append(asyncio.create_task(client.send(requests[i % len(requests)], due, phase_start)))
    return tasks, phase_start


async def run_scenario(
    client: Client,
    options: OverloadOptions,
    texts: Sequence[str],
    capacity_rps: float,
    factor: float,
    deadline_ms: int | None,
) -> Scenario:
    scenario = Scenario(factor, deadline_ms, factor * capacity_rps)
    tasks, phase_start = await open_loop(
        client, bodies(texts, deadline_ms), scenario.offered_rps, options.duration_s, options.seed
    )
    # Recovery: the moment the overload ends (its stragglers still finishing), load drops to
    # ``recovery_factor`` x capacity with the same deadlines, open loop.
    await asyncio.sleep(max(0.0, phase_start + options.duration_s - time.perf_counter()))
    recovery_tasks, _ = await open_loop(
        client,
        bodies(texts, deadline_ms),
        options.recovery_factor * capacity_rps,
        options.recovery_s,
        options.seed + 1,
    )
    scenario.overload = list(await asyncio.gather(*tasks))
    scenario.recovery = list(await asyncio.gather(*recovery_tasks))
    return scenario


def summarize(scenario: Scenario, capacity_rps: float, duration_s: float) -> dict[str, Any]:
    """The figures RELIABILITY.md reports for one scenario."""
    outcomes = scenario.overload
    deadline_s = None if scenario.deadline_ms is None else scenario.deadline_ms / 1000.0
    statuses = Counter(o.status for o in outcomes)
    ok = [o for o in outcomes if o.status == "200"]
    good = [o for o in ok if deadline_s is None or o.latency_s <= deadline_s]
    refused = [o for o in outcomes if o.status in REFUSALS]
    lost = [o for o in outcomes if o.status.startswith("lost:")]
    server_refused_s = [o.server_s for o in refused if o.server_s is not None]
    goodput_rps = len(good) / duration_s

    def ms(values: list[float], q: float) -> float | None:
        return round(percentile(values, q) * 1000.0, 1) if values else None

    return {
        "factor": scenario.factor,
        "deadline_ms": scenario.deadline_ms,
        "offered_rps": round(scenario.offered_rps, 1),
        "num_requests": len(outcomes),
        "statuses": dict(sorted(statuses.items())),
        "goodput_rps": round(goodput_rps, 1),
        "goodput_vs_capacity": round(goodput_rps / capacity_rps, 3),
        "ok_late": len(ok) - len(good),
        "num_refused": len(refused),
        "refused_p50_ms": ms([o.latency_s for o in refused], 50),
        "refused_p99_ms": ms([o.latency_s for o in refused], 99),
        "refused_within_50ms": round(sum(o.latency_s <= 0.05 for o in refused) / len(refused), 4)
        if refused
        else None,
        "refused_with_retry_after": all(o.retry_after for o in refused),
        "refused_server_p99_ms": ms(server_refused_s, 99),
        "refused_server_max_ms": round(max(server_refused_s) * 1000, 1) if server_refused_s else None,
        "num_504": statuses.get("504", 0),
        "lost": len(lost),
        "ok_p50_ms": ms([o.latency_s for o in ok], 50),
        "ok_p99_ms": ms([o.latency_s for o in ok], 99),
        "recovery": recovery_summary(scenario.recovery, scenario.deadline_ms),
    }


def recovery_summary(outcomes: Sequence[Outcome], deadline_ms: int | None) -> dict[str, Any]:
    """How the normal load after the overload fared: the share answered in time per half second of
    its schedule, and ``back_to_normal_s``, the earliest time after the overload's end from which at
    least 99 % of requests (by scheduled time) were answered 200 within the deadline."""
    deadline_s = math.inf if deadline_ms is None else deadline_ms / 1000.0

    def good(o: Outcome) -> bool:
        return o.status == "200" and o.latency_s <= deadline_s

    by_half_second = []
    for k in range(int(max((o.scheduled_s for o in outcomes), default=0.0) / 0.5) + 1):
        due = [o for o in outcomes if k * 0.5 <= o.scheduled_s < (k + 1) * 0.5]
        by_half_second.append(round(sum(map(good, due)) / len(due), 3) if due else None)
    back_s = None
    for quarter in range(0, 4 * 10):
        later = [o for o in outcomes if o.scheduled_s >= quarter * 0.25]
        if later and sum(map(good, later)) >= 0.99 * len(later):
            back_s = quarter * 0.25
            break
    return {
        "num_requests": len(outcomes),
        "good_share_by_half_second": by_half_second,
        "back_to_normal_s": back_s,
        "statuses": dict(sorted(Counter(o.status for o in outcomes).items())),
    }


def _texts(num_words: int) -> list[str]:
    texts = [" ".join(e.text.split()[:num_words]) for e in load_split("test")]
    return [t for t in texts if len(t.split()) >= num_words // 2]


@contextlib.contextmanager
def _target(options: OverloadOptions) -> Iterator[tuple[str, dict[str, Any]]]:
    if options.url is not None:
        yield options.url, {"url": options.url, "started_here": False}
        return
    argv = [sys.executable, "-m", "server", "--store", str(options.store), "--model", options.model]
    argv += ["--host", "{host}", "--port", "{port}"]
    spec = ServerSpec(name="overload-server", argv=[*argv, *options.server_args])
    with running(spec, options.out_dir / "logs") as server:
        yield server.url, {"started_here": True, "server_args": list(options.server_args), "pid": server.pid}


async def measure(options: OverloadOptions, url: str, texts: Sequence[str]) -> dict[str, Any]:
    """Capacity, then every (factor, deadline mode) scenario, against ``url``."""
    client = Client(url, options.max_connections, options.client_timeout_s)
    try:
        unbounded = bodies(texts, CAPACITY_DEADLINE_MS)
        await closed_loop(client, unbounded, options.capacity_concurrency, 3.0, time.perf_counter())
        start = time.perf_counter()
        capacity = await closed_loop(
            client, unbounded, options.capacity_concurrency, options.capacity_s, start
        )
        num_ok = sum(o.status == "200" for o in capacity)
        capacity_rps = num_ok / max(o.done_s for o in capacity)
        results: list[dict[str, Any]] = []
        for deadline_ms in options.deadline_modes:
            for factor in options.factors:
                await asyncio.sleep(2.0)  # let the previous scenario's work finish
                scenario = await run_scenario(client, options, texts, capacity_rps, factor, deadline_ms)
                results.append(summarize(scenario, capacity_rps, options.duration_s))
                print(json.dumps(results[-1]), flush=True)
        # Capacity again at the end: on a shared machine it moves between measurements; the figures
        # above are against the first, this one says by how much it moved.
        after_rps: float | None = None
        if options.capacity_after:
            await asyncio.sleep(2.0)
            start = time.perf_counter()
            after = await closed_loop(
                client, unbounded, options.capacity_concurrency, options.capacity_s, start
            )
            after_rps = sum(o.status == "200" for o in after) / max(o.done_s for o in after)
        return {
            "capacity": {
                "rps": round(capacity_rps, 1),
                "rps_after": None if after_rps is None else round(after_rps, 1),
                "concurrency": options.capacity_concurrency,
                "duration_s": options.capacity_s,
                "statuses": dict(Counter(o.status for o in capacity)),
            },
            "scenarios": results,
        }
    finally:
        await client.close()


def run_overload(options: OverloadOptions) -> dict[str, Any]:
    """The whole run; writes ``overload.json`` into ``out_dir`` and returns its document."""
    texts = _texts(options.num_words)
    started_at = now_iso()
    with _target(options) as (url, target):
        figures = asyncio.run(measure(options, url, texts))
    document = {
        "name": "overload",
        "started_at": started_at,
        "machine": machine_info(),
        "commit": git_commit(),
        "target": target,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "num_texts": len(texts),
        **figures,
    }
    options.out_dir.mkdir(parents=True, exist_ok=True)
    (options.out_dir / "overload.json").write_text(json.dumps(document, indent=2) + "\n")
    return document


def markdown_table(document: dict[str, Any]) -> str:
    """The scenarios of an overload run as the table RELIABILITY.md shows."""
    capacity = document["capacity"]
    rows = [
        "| load | deadline | offered req/s | answered 200 in time, req/s | ÷ capacity | 429 | 504 | late 200 "
        "| lost | refusals ≤ 50 ms (p99) | refusal p99 / max in the server | `Retry-After` on all "
        "| 200 p50 / p99 ms | back to normal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in document["scenarios"]:
        deadline = f"{s['deadline_ms']} ms" if s["deadline_ms"] is not None else "none"
        refused = (
            f"{100 * s['refused_within_50ms']:.1f} % ({s['refused_p99_ms']} ms)" if s["num_refused"] else "-"
        )
        back = s["recovery"]["back_to_normal_s"]
        rows.append(
            f"| {s['factor']}x | {deadline} | {s['offered_rps']} | **{s['goodput_rps']}** "
            f"| {s['goodput_vs_capacity']:.2f} | {s['statuses'].get('429', 0)} | {s['num_504']} "
            f"| {s['ok_late']} "
            f"| **{s['lost']}** | {refused} "
            f"| {s.get('refused_server_p99_ms')} / {s.get('refused_server_max_ms')} ms "
            f"| {'yes' if s['refused_with_retry_after'] else 'no'} "
            f"| {s['ok_p50_ms']} / {s['ok_p99_ms']} | {'-' if back is None else f'{back:g} s'} |"
        )
    after = capacity.get("rps_after")
    note = f" (again at the end: {after} req/s)" if after is not None else ""
    return f"Capacity (closed loop, speed 0): {capacity['rps']} req/s{note}.\n\n" + "\n".join(rows)
