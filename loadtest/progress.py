"""Live progress of a run on the terminal: one line redrawn in place (or a line every few seconds
when the output is not a terminal, e.g. under ``make`` piped to a log)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from typing import TextIO

from loadtest.stats import percentile


class Progress:
    """Counts what a run has done so far; ``render`` draws it, ``run_display`` redraws it periodically."""

    def __init__(self, label: str, max_requests: int, max_duration_s: float, stream: TextIO | None = None):
        self.label = label
        self.max_requests = max_requests
        self.max_duration_s = max_duration_s
        self.stream = stream
        self.num_done = 0
        self.num_errors = 0
        self.started_at = time.perf_counter()
        self._recent_latencies_s: deque[float] = deque(maxlen=2000)

    def record(self, ok: bool, latency_s: float) -> None:
        self.num_done += 1
        if ok:
            self._recent_latencies_s.append(latency_s)
        else:
            self.num_errors += 1

    def render(self) -> str:
        elapsed_s = time.perf_counter() - self.started_at
        rate = self.num_done / elapsed_s if elapsed_s > 0 else 0.0
        recent = list(self._recent_latencies_s)
        p50 = f"{percentile(recent, 50) * 1000:.1f}" if recent else "-"
        p99 = f"{percentile(recent, 99) * 1000:.1f}" if recent else "-"
        return (
            f"[{self.label}] {self.num_done}/{self.max_requests} req  {rate:7.1f} req/s  "
            f"p50 {p50} ms  p99 {p99} ms  errors {self.num_errors}  "
            f"{elapsed_s:5.1f}/{self.max_duration_s:g} s"
        )

    async def run_display(self, interval_s: float = 0.5) -> None:
        """Redraw until cancelled."""
        if self.stream is None:
            return
        is_tty = self.stream.isatty()
        every_s = interval_s if is_tty else 5.0
        try:
            while True:
                await asyncio.sleep(every_s)
                self._write(is_tty)
        finally:
            self._write(is_tty)
            if is_tty:
                self.stream.write("\n")
            self.stream.flush()

    def _write(self, is_tty: bool) -> None:
        assert self.stream is not None
        line = self.render()
        self.stream.write(f"\r{line}\033[K" if is_tty else line + "\n")
        self.stream.flush()


def stderr_progress(label: str, max_requests: int, max_duration_s: float, quiet: bool) -> Progress:
    return Progress(label, max_requests, max_duration_s, stream=None if quiet else sys.stderr)
