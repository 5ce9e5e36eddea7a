"""Live progress of a run on the terminal (tqdm: one line redrawn in place, or a line every few seconds
when the output is not a terminal, e.g. under ``make`` piped to a log), with the recent latency."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from typing import TextIO

from tqdm import tqdm

from loadtest.stats import percentile


class Progress:
    """Counts what a run has done so far; ``run_display`` shows it, redrawn periodically."""

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

    def postfix(self) -> str:
        """Latency of the recent answers and the errors so far."""
        recent = list(self._recent_latencies_s)
        p50 = f"{percentile(recent, 50) * 1000:.1f}" if recent else "-"
        p99 = f"{percentile(recent, 99) * 1000:.1f}" if recent else "-"
        elapsed_s = time.perf_counter() - self.started_at
        return (
            f"p50 {p50} ms, p99 {p99} ms, errors {self.num_errors}, {elapsed_s:.0f}/{self.max_duration_s:g} s"
        )

    async def run_display(self, interval_s: float = 0.5) -> None:
        """Redraw (tqdm: in place on a terminal, a line every few seconds otherwise) until cancelled."""
        if self.stream is None:
            return
        every_s = interval_s if self.stream.isatty() else 5.0
        bar = tqdm(
            total=self.max_requests,
            desc=self.label,
            unit="req",
            file=self.stream,
            mininterval=every_s,
            dynamic_ncols=True,
        )
        try:
            while True:
                await asyncio.sleep(every_s)
                self._update(bar)
        finally:
            self._update(bar)
            bar.close()

    def _update(self, bar: tqdm) -> None:
        bar.n = self.num_done
        bar.set_postfix_str(self.postfix(), refresh=False)
        bar.refresh()


def stderr_progress(label: str, max_requests: int, max_duration_s: float, quiet: bool) -> Progress:
    return Progress(label, max_requests, max_duration_s, stream=None if quiet else sys.stderr)
