"""``python -m loadtest beyond``: degradation before 429, and anytime answers, through HTTP, one run.

One server (started here with only ``--store``/``--model``, or a running one with ``--url``), the
SpamAssassin test split as inputs (one email per request, labels kept), open loop (Poisson):

1. **reference**: every text once at full depth (speed 0): the full-depth answer each later answer is
   compared with; then **capacity**: closed loop at speed 0 (as ``loadtest overload`` measures it).
2. **degrade vs 429**: ``overload_factor`` x capacity for ``overload_s``, every request at speed 0 with
   ``deadline_ms``; once with nothing else (the plain 429 policy of admission by time), once with
   ``overload_max_accuracy_drop`` (the server may run faster calibrated settings within that drop). Each
   is followed at once by ``recovery_factor`` x capacity for ``recovery_s``: how soon answers are normal.
3. **anytime**: steady load (``steady_factor`` x capacity) at full depth with a deadline that full-depth
   requests miss for at least 30 % of rows: that deadline is the ``miss_quantile`` of full-depth latency
   measured at that load first (shortened until the 504 policy really misses it for 30 % of rows);
   then the same load and deadline with ``on_deadline: best_effort``.

Reported per scenario: goodput (200 within the deadline as the client measured it, from the scheduled
send time), 429s, 504s, p50/p99, the accuracy of the answered rows against their labels and their
agreement with full depth, next to the accuracy of the same rows at full depth, mean exit layer, and
(degrade) the share of rows degraded, (anytime) the share cut at the deadline.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.arrivals import poisson_arrival_times_s
from loadtest.dataset import load_split
from loadtest.machine import git_commit, machine_info, now_iso
from loadtest.overload import HEADERS, OverloadOptions, _target
from loadtest.stats import percentile
from loadtest.transport import LoopbackTransport

CAPACITY_DEADLINE_MS = 60_000
MIN_MISS_SHARE = 0.30  # anytime: full-depth requests must miss the deadline this often


@dataclass(frozen=True)
class BeyondOptions:
    """One run (see the module docstring)."""

    store: Path = Path("store")
    model: str = "spam-minilm"
    url: str | None = None
    out_dir: Path = Path("bench-out")
    overload_factor: float = 2.0
    overload_s: float = 60.0
    deadline_ms: int = 1000
    allowed_drop_pts: float = 1.0
    recovery_s: float = 5.0
    recovery_factor: float = 0.7
    capacity_s: float = 15.0
    capacity_concurrency: int = 32
    steady_factor: float = 0.9
    steady_s: float = 30.0
    miss_quantile: float = 30.0  # the anytime deadline: this percentile of full-depth latency at load
    client_timeout_s: float = 10.0
    max_connections: int = 1024
    server_args: tuple[str, ...] = ()
    seed: int = 0


@dataclass(frozen=True)
class Answer:
    """One request: its text, when it was due and answered (s from the phase start), and the reply."""

    index: int
    scheduled_s: float
    done_s: float
    status: str
    label: str | None = None
    exit_layer: int | None = None
    degraded: bool = False
    deadline_exit: bool = False
    stated_agreement: float | None = None

    @property
    def latency_s(self) -> float:
        return self.done_s - self.scheduled_s


@dataclass
class Phase:
    name: str
    offered_rps: float
    deadline_ms: int | None
    answers: list[Answer] = field(default_factory=list)
    recovery: list[Answer] = field(default_factory=list)


class JsonClient:
    """Keep-alive loopback connections that read each reply's JSON (the project's loopback transport)."""

    def __init__(self, url: str, num_connections: int, timeout_s: float) -> None:
        self.url = httpx.URL(url.rstrip("/") + "/v1/classify")
        self._pool: asyncio.LifoQueue[LoopbackTransport] = asyncio.LifoQueue()
        self._all = [LoopbackTransport(timeout_s=timeout_s) for _ in range(num_connections)]
        for connection in self._all:
            self._pool.put_nowait(connection)

    async def close(self) -> None:
        for connection in self._all:
            await connection.aclose()

    async def send(self, index: int, body: bytes, scheduled_at: float, phase_start: float) -> Answer:
        connection = await self._pool.get()
        try:
            reply = await connection.handle_async_request(
                httpx.Request("POST", self.url, content=body, headers=HEADERS)
            )
            status = str(reply.status_code)
            payload = json.loads(reply.content) if reply.status_code == 200 else None
        except httpx.HTTPError as e:
            status, payload = f"lost:{type(e).__name__}", None
        finally:
            self._pool.put_nowait(connection)
        done_s = time.perf_counter() - phase_start
        if payload is None:
            return Answer(index, scheduled_at - phase_start, done_s, status)
        row = payload["results"][0]
        return Answer(
            index,
            scheduled_at - phase_start,
            done_s,
            status,
            label=row["label"],
            exit_layer=row["exit_layer"],
            degraded=bool(payload.get("degraded", False)),
            deadline_exit=bool(row.get("deadline_exit", False)),
            stated_agreement=row.get("full_depth_agreement"),
        )


def _body(text: str, **options: Any) -> bytes:
    return json.dumps({"inputs": text, "speed": 0.0, **options}).encode()


async def closed_loop(
    client: JsonClient, bodies: Sequence[bytes], concurrency: int, duration_s: float | None
) -> list[Answer]:
    """``concurrency`` requests in flight: for ``duration_s``, or once through ``bodies`` (None)."""
    answers: list[Answer] = []
    start = time.perf_counter()
    counter = iter(range(10**9 if duration_s is not None else len(bodies)))

    async def worker() -> None:
        for i in counter:
            now = time.perf_counter()
            if duration_s is not None and now - start >= duration_s:
                return
            answers.append(await client.send(i % len(bodies), bodies[i % len(bodies)], now, start))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


async def open_loop(
    client: JsonClient, bodies: Sequence[bytes], rate_per_s: float, duration_s: float, seed: int
) -> list[asyncio.Task[Answer]]:
    rng = random.Random(seed)
    arrivals_s = poisson_arrival_times_s(rate_per_s, int(rate_per_s * duration_s * 2) + 10, rng)
    order = list(range(len(bodies)))
    rng.shuffle(order)
    phase_start = time.perf_counter()
    tasks = []
    for i, arrival_s in enumerate(arrivals_s):
        if arrival_s >= duration_s:
            break
        due = phase_start + arrival_s
        delay_s = due - time.perf_counter()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        index = order[i % len(order)]
        tasks.append(asyncio.create_task(client.send(index, bodies[index], due, phase_start)))
    return tasks


async def run_phase(
    client: JsonClient,
    name: str,
    bodies: Sequence[bytes],
    rate_per_s: float,
    duration_s: float,
    deadline_ms: int | None,
    seed: int,
    recovery: tuple[Sequence[bytes], float, float] | None = None,
) -> Phase:
    phase = Phase(name, rate_per_s, deadline_ms)
    started = time.perf_counter()
    tasks = await open_loop(client, bodies, rate_per_s, duration_s, seed)
    recovery_tasks: list[asyncio.Task[Answer]] = []
    if recovery is not None:
        await asyncio.sleep(max(0.0, started + duration_s - time.perf_counter()))
        recovery_bodies, recovery_rps, recovery_s = recovery
        recovery_tasks = await open_loop(client, recovery_bodies, recovery_rps, recovery_s, seed + 1)
    phase.answers = list(await asyncio.gather(*tasks))
    phase.recovery = list(await asyncio.gather(*recovery_tasks))
    return phase


def summarize(
    phase: Phase, duration_s: float, reference: dict[int, str], labels: Sequence[str]
) -> dict[str, Any]:
    answers = phase.answers
    deadline_s = None if phase.deadline_ms is None else phase.deadline_ms / 1000.0
    statuses = Counter(a.status for a in answers)
    ok = [a for a in answers if a.status == "200"]
    good = [a for a in ok if deadline_s is None or a.latency_s <= deadline_s]

    def ms(values: list[float], q: float) -> float | None:
        return round(percentile(values, q) * 1000.0, 1) if values else None

    def share(values: list[bool]) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    return {
        "name": phase.name,
        "offered_rps": round(phase.offered_rps, 1),
        "deadline_ms": phase.deadline_ms,
        "num_requests": len(answers),
        "statuses": dict(sorted(statuses.items())),
        "goodput_rps": round(len(good) / duration_s, 1),
        "answered_in_time": share([a in good for a in answers]),
        "num_429": statuses.get("429", 0),
        "num_504": statuses.get("504", 0),
        "ok_late": len(ok) - len(good),
        "ok_p50_ms": ms([a.latency_s for a in ok], 50),
        "ok_p99_ms": ms([a.latency_s for a in ok], 99),
        "accuracy": share([a.label == labels[a.index] for a in good]),
        "full_depth_accuracy_same_rows": share([reference[a.index] == labels[a.index] for a in good]),
        "agreement_with_full_depth": share([a.label == reference[a.index] for a in good]),
        # Rows whose answer differs from full depth's: right where full depth was wrong, and the reverse.
        "num_better_than_full_depth": sum(
            a.label != reference[a.index] and a.label == labels[a.index] for a in good
        ),
        "num_worse_than_full_depth": sum(
            a.label != reference[a.index] and reference[a.index] == labels[a.index] for a in good
        ),
        "mean_stated_agreement": round(sum(a.stated_agreement or 0.0 for a in good) / len(good), 4)
        if good
        else None,
        "mean_exit_layer": round(sum(a.exit_layer or 0 for a in good) / len(good), 3) if good else None,
        "exit_layers": dict(sorted(Counter(a.exit_layer for a in good).items())),
        "degraded_share": share([a.degraded for a in good]),
        "deadline_exit_share": share([a.deadline_exit for a in good]),
        "recovery": _recovery(phase.recovery, deadline_s) if phase.recovery else None,
    }


def _recovery(answers: Sequence[Answer], deadline_s: float | None) -> dict[str, Any]:
    """``back_to_normal_s``: the earliest time after the overload's end from which at least 99 % of
    requests (by scheduled time) were answered 200 in time, at the setting they asked for."""
    limit_s = float("inf") if deadline_s is None else deadline_s

    def normal(a: Answer) -> bool:
        return a.status == "200" and a.latency_s <= limit_s and not a.degraded

    back_s = None
    for quarter in range(0, 4 * 10):
        later = [a for a in answers if a.scheduled_s >= quarter * 0.25]
        if later and sum(map(normal, later)) >= 0.99 * len(later):
            back_s = quarter * 0.25
            break
    return {
        "num_requests": len(answers),
        "back_to_normal_s": back_s,
        "statuses": dict(sorted(Counter(a.status for a in answers).items())),
        "degraded": sum(a.degraded for a in answers),
    }


async def measure(
    options: BeyondOptions, url: str, texts: Sequence[str], labels: Sequence[str]
) -> dict[str, Any]:
    client = JsonClient(url, options.max_connections, options.client_timeout_s)
    d = options.deadline_ms
    try:
        unbounded = [_body(t, deadline_ms=CAPACITY_DEADLINE_MS) for t in texts]
        print("reference: every text at full depth", flush=True)
        reference_answers = await closed_loop(client, unbounded, 16, None)
        assert all(a.status == "200" for a in reference_answers), Counter(a.status for a in reference_answers)
        reference = {a.index: str(a.label) for a in reference_answers}
        print("capacity", flush=True)
        capacity = await closed_loop(client, unbounded, options.capacity_concurrency, options.capacity_s)
        capacity_rps = sum(a.status == "200" for a in capacity) / max(a.done_s for a in capacity)
        print(f"capacity {capacity_rps:.1f} req/s", flush=True)
        results: list[dict[str, Any]] = []
        overload_rps = options.overload_factor * capacity_rps
        recovery_rps = options.recovery_factor * capacity_rps
        for name, extra in (
            ("429 policy", {}),
            ("degrade policy", {"overload_max_accuracy_drop": options.allowed_drop_pts}),
        ):
            await asyncio.sleep(3.0)
            bodies = [_body(t, deadline_ms=d, **extra) for t in texts]
            phase = await run_phase(
                client,
                name,
                bodies,
                overload_rps,
                options.overload_s,
                d,
                options.seed,
                (bodies, recovery_rps, options.recovery_s),
            )
            results.append(summarize(phase, options.overload_s, reference, labels))
            print(json.dumps(results[-1]), flush=True)
        # Anytime: find the deadline full depth misses at steady load, then best effort at it.
        steady_rps = options.steady_factor * capacity_rps
        await asyncio.sleep(3.0)
        probe = await run_phase(
            client, "steady, no deadline", unbounded, steady_rps, options.steady_s / 2, None, 7
        )
        latencies = [a.latency_s for a in probe.answers if a.status == "200"]
        anytime_ms = max(10, int(percentile(latencies, options.miss_quantile) * 1000.0))
        anytime: list[dict[str, Any]] = [summarize(probe, options.steady_s / 2, reference, labels)]
        # The deadline must make full depth miss for >= 30 % of rows (measured, not assumed): shorten it
        # until the 504 policy does, then run best effort at the same deadline.
        for attempt in range(4):
            await asyncio.sleep(3.0)
            bodies = [_body(t, deadline_ms=anytime_ms) for t in texts]
            phase = await run_phase(
                client,
                "full depth, 504 at the deadline",
                bodies,
                steady_rps,
                options.steady_s,
                anytime_ms,
                11,
            )
            anytime.append(summarize(phase, options.steady_s, reference, labels))
            print(json.dumps(anytime[-1]), flush=True)
            if 1.0 - (anytime[-1]["answered_in_time"] or 0.0) >= MIN_MISS_SHARE or attempt == 3:
                break
            anytime_ms = max(10, int(anytime_ms * 0.6))
        await asyncio.sleep(3.0)
        bodies = [_body(t, deadline_ms=anytime_ms, on_deadline="best_effort") for t in texts]
        phase = await run_phase(
            client,
            "full depth, best effort at the deadline",
            bodies,
            steady_rps,
            options.steady_s,
            anytime_ms,
            11,
        )
        anytime.append(summarize(phase, options.steady_s, reference, labels))
        print(json.dumps(anytime[-1]), flush=True)
        reference_accuracy = sum(reference[i] == labels[i] for i in reference) / len(reference)
        return {
            "capacity": {"rps": round(capacity_rps, 1), "concurrency": options.capacity_concurrency},
            "reference": {"num_texts": len(reference), "full_depth_accuracy": round(reference_accuracy, 4)},
            "degrade": results,
            "anytime": {"deadline_ms": anytime_ms, "steady_rps": round(steady_rps, 1), "phases": anytime},
        }
    finally:
        await client.close()


def run_beyond(options: BeyondOptions) -> dict[str, Any]:
    """The whole run; writes ``beyond.json`` into ``out_dir`` and returns its document."""
    examples = load_split("test")
    texts = [e.text for e in examples]
    labels = [e.label for e in examples]
    started_at = now_iso()
    target_options = OverloadOptions(
        store=options.store, model=options.model, url=options.url, out_dir=options.out_dir,
        server_args=options.server_args,
    )  # fmt: skip
    with _target(target_options) as (url, target):
        figures = asyncio.run(measure(options, url, texts, labels))
    document = {
        "name": "beyond",
        "started_at": started_at,
        "machine": machine_info(),
        "commit": git_commit(),
        "target": target,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        **figures,
    }
    options.out_dir.mkdir(parents=True, exist_ok=True)
    (options.out_dir / "beyond.json").write_text(json.dumps(document, indent=2) + "\n")
    return document


def markdown_tables(document: dict[str, Any]) -> str:
    """The run as the tables BENCHMARKS.md shows."""

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f} %"

    ref = document["reference"]
    lines = [
        f"Machine: {document['machine'].get('summary', document['machine'])}; commit `{document['commit']}`; "
        f"capacity (closed loop, speed 0): {document['capacity']['rps']} req/s; "
        f"{ref['num_texts']} test emails, full-depth accuracy {pct(ref['full_depth_accuracy'])}.",
        "",
        "| policy | offered req/s | goodput req/s | 429 | 504 | late 200 | p50 / p99 ms "
        "| accuracy (answered) | same rows at full depth | agreement with full depth | mean exit layer "
        "| degraded | back to normal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in document["degrade"]:
        back = (s["recovery"] or {}).get("back_to_normal_s")
        lines.append(
            f"| {s['name']} | {s['offered_rps']} | **{s['goodput_rps']}** | {s['num_429']} | {s['num_504']} "
            f"| {s['ok_late']} | {s['ok_p50_ms']} / {s['ok_p99_ms']} | {pct(s['accuracy'])} "
            f"| {pct(s['full_depth_accuracy_same_rows'])} | {pct(s['agreement_with_full_depth'])} "
            f"| {s['mean_exit_layer']} | {pct(s['degraded_share'])} "
            f"| {'-' if back is None else f'{back:g} s'} |"
        )
    a = document["anytime"]
    lines += [
        "",
        f"Anytime: steady load {a['steady_rps']} req/s, deadline {a['deadline_ms']} ms "
        "(from the full-depth latency at that load without a deadline, shortened until full-depth "
        "requests with a deadline miss it for at least 30 % of rows).",
        "",
        "| requests | deadline | answered 200 in time | 429 | 504 | late 200 | p50 / p99 ms "
        "| accuracy (answered) | same rows at full depth | agreement with full depth | mean exit layer "
        "| cut at the deadline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in a["phases"]:
        deadline = "none" if s["deadline_ms"] is None else f"{s['deadline_ms']} ms"
        lines.append(
            f"| {s['name']} | {deadline} | **{pct(s['answered_in_time'])}** | {s['num_429']} "
            f"| {s['num_504']} | {s['ok_late']} | {s['ok_p50_ms']} / {s['ok_p99_ms']} | {pct(s['accuracy'])} "
            f"| {pct(s['full_depth_accuracy_same_rows'])} | {pct(s['agreement_with_full_depth'])} "
            f"| {s['mean_exit_layer']} | {pct(s['deadline_exit_share'])} |"
        )
    return "\n".join(lines)
