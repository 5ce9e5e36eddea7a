"""CUDA graphs for the launch-bound regime: one captured layer step per (layer, row bucket, seq bucket).

Why: below ~64 rows a transformer layer on a GPU costs about as much as at 64 (one BERT-base layer at 128
tokens on an H100: 0.30 ms at batch 1, 0.42 ms at 64, eager fp16, as issue 13 records it; not re-measured
here), because the host launches ~60 kernels per step one by one. Early exit makes batches shrink layer
by layer, so most steps live there. Replaying a captured graph launches the whole step (layer, ramp, exit
decision, packing) at once.

How: at start-up, for every layer and every bucket the settings allow (row counts up to
``max_batch_size``, sequence lengths up to the model's ``max_seq_length``), ``compute_step`` is captured
on static buffers of the bucket's shape. A step copies its rows into the buffers of the smallest bucket
that holds it, replays, and takes its rows' outputs back. Padding rows attend to one zeroed token and
padded positions are masked out of attention and pooling, so real rows get what eager gives them; the
padding is never answered (only the first ``rows`` outputs are read). A step larger than every bucket runs
eagerly. Buckets are powers of two up to 32 rows, then every half power (48, 64, 96, ...), so at most a
third of a big step is padding; sequence buckets are powers of two from 16 plus the maximum.

The bucket choice and the graph cache are plain code: ``EagerReplayBackend`` "captures" by keeping the
function and replays it eagerly on the same static buffers, which is how CPU tests exercise this module.
``CudaGraphBackend`` is the real one (``torch.cuda.CUDAGraph`` in one shared memory pool: steps run one
at a time, and each copies its outputs out before the next replay).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from model_store.criteria import NO_LABEL, PatienceState
from model_store.early_exit import EarlyExitClassifier
from server.engine.step_kernel import PACKED_HEAD, StepTensors, compute_step

MIN_SEQ_BUCKET = 16


def row_buckets(max_rows: int) -> tuple[int, ...]:
    """1, 2, 4, ... 32, then 48, 64, 96, 128, ...; the last is ``max_rows`` itself."""
    out: list[int] = []
    size = 1
    while size < max_rows:
        out.append(size)
        if size >= 32:
            half = size + size // 2
            if half < max_rows:
                out.append(half)
        size *= 2
    out.append(max_rows)
    return tuple(sorted(set(out)))


def seq_buckets(max_seq_length: int) -> tuple[int, ...]:
    """16, 32, 64, ... up to and including ``max_seq_length``."""
    out = []
    size = MIN_SEQ_BUCKET
    while size < max_seq_length:
        out.append(size)
        size *= 2
    out.append(max_seq_length)
    return tuple(out)


def bucket_for(value: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket >= ``value``; None when ``value`` exceeds them all."""
    i = bisect.bisect_left(buckets, value)
    return buckets[i] if i < len(buckets) else None


class GraphBackend(Protocol):
    def capture(self, step: Callable[[], None]) -> Callable[[], None]:
        """Capture ``step`` (which reads and writes only static buffers); returns its replay."""

    def memory_bytes(self) -> int:
        """Device memory the captured graphs hold."""


class EagerReplayBackend:
    """No capture: replay calls the function again. CPU tests (and the bookkeeping's proof) use it."""

    def __init__(self) -> None:
        self.num_captured = 0

    def capture(self, step: Callable[[], None]) -> Callable[[], None]:
        self.num_captured += 1
        return step

    def memory_bytes(self) -> int:
        return 0


class CudaGraphBackend:
    """``torch.cuda.CUDAGraph`` captures sharing one memory pool (replays never overlap)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self._graphs: list[torch.cuda.CUDAGraph] = []
        self._reserved_before = torch.cuda.memory_reserved(device)

    def capture(self, step: Callable[[], None]) -> Callable[[], None]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS handles, autotuning)
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step()
        self._graphs.append(graph)
        return graph.replay

    def memory_bytes(self) -> int:
        return max(0, torch.cuda.memory_reserved(self.device) - self._reserved_before)


@dataclass
class _Static:
    """Bucket-sized buffers one (rows, seq) bucket's graphs read and write."""

    hidden: torch.Tensor
    mask: torch.Tensor
    criterion_codes: torch.Tensor
    thresholds: torch.Tensor
    max_layers: torch.Tensor
    last_label: torch.Tensor
    num_agreeing: torch.Tensor
    out_hidden: torch.Tensor
    out_packed: torch.Tensor
    out_last_label: torch.Tensor
    out_num_agreeing: torch.Tensor


@dataclass(frozen=True)
class CaptureReport:
    num_graphs: int
    row_buckets: tuple[int, ...]
    seq_buckets: tuple[int, ...]
    seconds: float
    memory_bytes: int


class GraphedSteps:
    """Captured layer steps for every (layer, row bucket, seq bucket); ``run`` replays the right one."""

    def __init__(
        self,
        model: EarlyExitClassifier,
        max_rows: int,
        max_seq_length: int,
        dtype: torch.dtype,
        device: torch.device,
        backend: GraphBackend,
        seq_bucket_sizes: tuple[int, ...] | None = None,
    ) -> None:
        self.model = model
        self.dtype = dtype
        self.device = device
        self.backend = backend
        self.row_buckets = row_buckets(max_rows)
        self.seq_buckets = seq_bucket_sizes or seq_buckets(max_seq_length)
        self._static: dict[tuple[int, int], _Static] = {}
        self._replays: dict[tuple[int, int, int], Callable[[], None]] = {}
        self.num_replays = 0

    @torch.inference_mode()
    def capture_all(self) -> CaptureReport:
        """Capture every graph the buckets allow (start-up)."""
        start = time.perf_counter()
        for rows in self.row_buckets:
            for seq in self.seq_buckets:
                static = self._buffers(rows, seq)
                for layer in range(1, self.model.num_layers + 1):
                    self._replays[(layer, rows, seq)] = self.backend.capture(self._step_fn(layer, static))
        return CaptureReport(
            num_graphs=len(self._replays),
            row_buckets=self.row_buckets,
            seq_buckets=self.seq_buckets,
            seconds=time.perf_counter() - start,
            memory_bytes=self.backend.memory_bytes(),
        )

    def run(
        self,
        layer: int,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        criterion_codes: torch.Tensor,
        thresholds: torch.Tensor,
        max_layers: torch.Tensor,
        patience: PatienceState,
    ) -> StepTensors | None:
        """Replay the step for these rows; None when no bucket holds them (the caller runs eagerly)."""
        num_rows, seq = mask.shape
        rows_bucket = bucket_for(num_rows, self.row_buckets)
        seq_bucket = bucket_for(seq, self.seq_buckets)
        if rows_bucket is None or seq_bucket is None:
            return None
        replay = self._replays.get((layer, rows_bucket, seq_bucket))
        if replay is None:
            return None
        s = self._static[(rows_bucket, seq_bucket)]
        # Padded positions and rows hold zeros (finite in every dtype: a masked key's value is multiplied
        # by a zero weight, and 0 * NaN would leak into real rows).
        s.hidden.zero_()
        s.hidden[:num_rows, :seq].copy_(hidden)
        s.mask.zero_()
        s.mask[:num_rows, :seq].copy_(mask)
        s.mask[num_rows:, 0] = 1  # a padding row attends to one token, so its softmax stays finite
        s.criterion_codes[:num_rows].copy_(criterion_codes)
        s.thresholds[:num_rows].copy_(thresholds)
        s.max_layers[:num_rows].copy_(max_layers)
        s.last_label[:num_rows].copy_(patience.last_label)
        s.num_agreeing[:num_rows].copy_(patience.num_agreeing)
        replay()
        self.num_replays += 1
        return StepTensors(
            hidden=s.out_hidden[:num_rows, :seq].clone(),  # the buffers are reused by the next replay
            packed=s.out_packed[:num_rows],  # read back before the next step is queued
            patience=PatienceState(
                s.out_last_label[:num_rows].clone(), s.out_num_agreeing[:num_rows].clone()
            ),
        )

    # --- helpers ----------------------------------------------------------------------------------

    def _buffers(self, rows: int, seq: int) -> _Static:
        key = (rows, seq)
        if key not in self._static:
            hidden_size = self.model.encoder.config.hidden_size
            d = self.device

            def longs(value: int) -> torch.Tensor:
                return torch.full((rows,), value, dtype=torch.long, device=d)

            mask = torch.zeros((rows, seq), dtype=torch.long, device=d)
            mask[:, 0] = 1
            self._static[key] = _Static(
                hidden=torch.zeros((rows, seq, hidden_size), dtype=self.dtype, device=d),
                mask=mask,
                criterion_codes=longs(0),
                thresholds=torch.zeros((rows,), dtype=torch.float32, device=d),
                max_layers=longs(self.model.num_layers),
                last_label=longs(NO_LABEL),
                num_agreeing=longs(0),
                out_hidden=torch.zeros((rows, seq, hidden_size), dtype=self.dtype, device=d),
                out_packed=torch.zeros(
                    (rows, PACKED_HEAD + self.model.num_labels), dtype=torch.float32, device=d
                ),
                out_last_label=longs(NO_LABEL),
                out_num_agreeing=longs(0),
            )
        return self._static[key]

    def _step_fn(self, layer: int, s: _Static) -> Callable[[], None]:
        model, dtype = self.model, self.dtype

        def step() -> None:
            out = compute_step(
                model,
                layer,
                s.hidden,
                model.layer_mask(s.mask, dtype),
                s.mask,
                s.criterion_codes,
                s.thresholds,
                s.max_layers,
                PatienceState(s.last_label, s.num_agreeing),
            )
            s.out_hidden.copy_(out.hidden)
            s.out_packed.copy_(out.packed)
            s.out_last_label.copy_(out.patience.last_label)
            s.out_num_agreeing.copy_(out.patience.num_agreeing)

        return step
