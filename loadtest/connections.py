"""``python -m loadtest connections``: normal requests while idle, slow and flooding clients attack.

One server (started here with its defaults, optionally under a lower open-file limit as in a container
whose limit is 1,024), then:

1. **baseline**: a closed loop of ``concurrency`` normal requests (a ~40-word email at the default
   speed) for ``duration_s``: latency percentiles;
2. **attack**: ``num_idle`` sockets that connect and send nothing, ``num_slow`` clients that send a
   request head one byte per second, ``num_floods`` clients that stream a header line without end
   (up to 50 MB each, reconnecting when cut off); the same closed loop runs meanwhile;
3. what the server did: the normal requests' latency against the baseline, its memory (RSS) before,
   at the peak and after, and when each idle socket was closed (evicted at the connection cap, or at
   the request-head timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.dataset import load_split
from loadtest.machine import git_commit, machine_info, now_iso
from loadtest.overload import Client, closed_loop
from loadtest.servers import ServerSpec, running
from loadtest.stats import percentile

FLOOD_LIMIT_BYTES = 50 * 2**20


@dataclass(frozen=True)
class ConnectionsOptions:
    store: Path = Path("store")
    model: str = "spam-minilm"
    out_dir: Path = Path("bench-out")
    num_idle: int = 1100
    num_slow: int = 50
    num_floods: int = 10
    concurrency: int = 4
    duration_s: float = 15.0
    server_nofile: int | None = 1024  # the server's open-file limit (soft and hard); None = inherited
    head_timeout_s: float = 10.0  # the server's documented default, what idle sockets are held to


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _latency_ms(outcomes: list[Any]) -> dict[str, float | None]:
    ok = [o.latency_s for o in outcomes if o.status == "200"]
    return {
        "num_ok": len(ok),
        "num_other": len(outcomes) - len(ok),
        "p50": round(percentile(ok, 50) * 1000, 1) if ok else None,
        "p99": round(percentile(ok, 99) * 1000, 1) if ok else None,
    }


async def _idle_socket(host: str, port: int, closed_after_s: list[float]) -> None:
    opened = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        closed_after_s.append(-1.0)  # refused at connect
        return
    try:
        await reader.read(1)  # b"" when the server closes it
        closed_after_s.append(time.perf_counter() - opened)
    except OSError:
        closed_after_s.append(time.perf_counter() - opened)
    finally:
        writer.close()


async def _slow_client(host: str, port: int, stop_at: float, statuses: list[str]) -> None:
    with contextlib.suppress(OSError):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")
        read = asyncio.create_task(reader.read(200))
        while time.perf_counter() < stop_at and not read.done():
            writer.write(b"X")
            await asyncio.sleep(1.0)
        reply = await read if read.done() else b""
        statuses.append(reply.split(b" ", 2)[1].decode() if reply.startswith(b"HTTP/") else "none")
        read.cancel()
        writer.close()


async def _flood_client(host: str, port: int, stop_at: float, sent: list[int]) -> None:
    chunk = b"a" * 65536
    while time.perf_counter() < stop_at:
        num_bytes = 0
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /healthz HTTP/1.1\r\nX-Flood: ")
            while num_bytes < FLOOD_LIMIT_BYTES and time.perf_counter() < stop_at:
                writer.write(chunk)
                await writer.drain()
                num_bytes += len(chunk)
            writer.close()
        except OSError:
            pass  # cut off by the server: start again
        sent.append(num_bytes)
        await asyncio.sleep(0.05)


async def measure(options: ConnectionsOptions, url: str, pid: int, texts: list[str]) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    bodies = [json.dumps({"inputs": t}).encode() for t in texts]
    client = Client(url, options.concurrency, 30.0)
    try:
        await closed_loop(client, bodies, options.concurrency, 3.0, time.perf_counter())  # warm-up
        baseline = await closed_loop(
            client, bodies, options.concurrency, options.duration_s, time.perf_counter()
        )
        rss_before = _rss_mib(pid)
        closed_after_s: list[float] = []
        slow_statuses: list[str] = []
        flood_sent: list[int] = []
        started = time.perf_counter()
        stop_at = started + options.duration_s + 3.0
        idle = [
            asyncio.create_task(_idle_socket(host, int(port), closed_after_s))
            for _ in range(options.num_idle)
        ]
        attackers = [
            asyncio.create_task(_slow_client(host, int(port), stop_at, slow_statuses))
            for _ in range(options.num_slow)
        ] + [
            asyncio.create_task(_flood_client(host, int(port), stop_at, flood_sent))
            for _ in range(options.num_floods)
        ]
        peak = rss_before

        async def watch_memory() -> None:
            nonlocal peak
            while True:
                peak = max(peak, _rss_mib(pid))
                await asyncio.sleep(0.25)

        watcher = asyncio.create_task(watch_memory())
        await asyncio.sleep(2.0)  # every attacker connected
        attacked = await closed_loop(
            client, bodies, options.concurrency, options.duration_s, time.perf_counter()
        )
        await asyncio.gather(*attackers)
        await asyncio.wait(
            idle, timeout=max(1.0, options.head_timeout_s + 5 - (time.perf_counter() - started))
        )
        watcher.cancel()
        rss_after = _rss_mib(pid)
        for task in idle:
            task.cancel()
        await asyncio.gather(*idle, return_exceptions=True)
    finally:
        await client.close()
    closed = sorted(t for t in closed_after_s if t >= 0)
    at_timeout = [t for t in closed if t >= options.head_timeout_s - 0.5]
    base, under = _latency_ms(baseline), _latency_ms(attacked)
    return {
        "baseline_ms": base,
        "under_attack_ms": under,
        "p99_ratio": round(under["p99"] / base["p99"], 2) if base["p99"] and under["p99"] else None,
        "rss_mib": {"before": round(rss_before, 1), "peak": round(peak, 1), "after": round(rss_after, 1)},
        "rss_growth_mib": round(peak - rss_before, 1),
        "idle": {
            "num": options.num_idle,
            "refused_at_connect": sum(1 for t in closed_after_s if t < 0),
            "closed": len(closed),
            "closed_early_by_eviction": len(closed) - len(at_timeout),
            "closed_at_head_timeout": len(at_timeout),
            "closed_after_s_min_max": [round(closed[0], 2), round(closed[-1], 2)] if closed else None,
            "still_open": options.num_idle - len(closed_after_s),
        },
        "slow_clients": dict(sorted({s: slow_statuses.count(s) for s in set(slow_statuses)}.items())),
        "floods": {"connections": len(flood_sent), "max_bytes_sent": max(flood_sent, default=0)},
    }


def _limit_files(nofile: int | None) -> Callable[[], None] | None:
    if nofile is None:
        return None

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return apply


@contextlib.contextmanager
def _raised_own_file_limit(wanted: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def run_connections(options: ConnectionsOptions) -> dict[str, Any]:
    texts = [" ".join(e.text.split()[:40]) for e in load_split("test")][:200]
    argv = [sys.executable, "-m", "server", "--store", str(options.store), "--model", options.model]
    argv += ["--host", "{host}", "--port", "{port}"]
    spec = ServerSpec(name="connections-server", argv=argv, preexec_fn=_limit_files(options.server_nofile))
    started_at = now_iso()
    wanted = options.num_idle + options.num_slow + options.num_floods + options.concurrency + 256
    with _raised_own_file_limit(wanted), running(spec, options.out_dir / "logs") as server:
        figures = asyncio.run(measure(options, server.url, server.pid, texts))
        log = server.log_path.read_text(errors="replace")
    figures["server_log_errors"] = sum(
        1 for line in log.splitlines() if " ERROR " in line or "Too many open files" in line
    )
    document = {
        "name": "connections",
        "started_at": started_at,
        "machine": machine_info(),
        "commit": git_commit(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        **figures,
    }
    options.out_dir.mkdir(parents=True, exist_ok=True)
    (options.out_dir / "connections.json").write_text(json.dumps(document, indent=2) + "\n")
    return document
