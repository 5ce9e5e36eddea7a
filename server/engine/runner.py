"""The runner computes what the scheduler planned: one layer, its ramp and the exit decision per row.

It keeps each cohort's hidden states on the device between steps, merges cohorts (re-padding to the
longest row), removes exited rows by index and trims padding no remaining row needs. Row lengths are
tracked on the host, so trimming, and knowing whether a cohort has padding at all, never synchronises.

On a GPU nothing in a step waits for the device except its one result transfer: the packed exit flags and
probabilities (the replies of the rows that exited must go out, so this one is unavoidable), copied into
pinned memory and waited for on an event. In particular:

* the attention mask is built once per cohort with tensor ops (``EncoderAdapter.layer_mask``) and kept
  and trimmed with the cohort's tensors, instead of the library's per-layer builder, whose all-ones
  check is a ``mask.all()`` evaluated on the device (one hidden sync per layer step);
* a cohort in which no row exited keeps its tensors as they are (no copy);
* a step's new rows (token ids, lengths, exit policy) travel in one pinned buffer, one non-blocking copy;
  the index tensors that select survivors are pinned and copied non-blocking too.

On a CPU (no transfer to save) a step reads its exit flags first (none at the last layer, where every
row leaves) and computes and reads the labels and probabilities only when a row leaves, as two lists
(``step_kernel.host_results``), never packed: a step that carries every row on, most steps of a deep
model, does no softmax and no per-row work (``step_kernel.decide_step``).

Half precision (``dtype``) applies to the encoder; the ramps and the exit decision stay float32. On CUDA,
layer steps up to ``max_batch_size`` rows replay captured graphs (``server/engine/graphs.py``).
"""

from __future__ import annotations

import contextlib
import logging
import struct
from array import array
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter
from typing import Any

import torch
import torch.nn.functional as F

from model_store.criteria import NO_LABEL, PatienceState
from model_store.early_exit import EarlyExitClassifier
from server.engine.graphs import CaptureReport, CudaGraphBackend, GraphBackend, GraphedSteps
from server.engine.messages import TOKEN_ID_TYPECODE
from server.engine.scheduler import RowExit, RowSpec, StepOutput, StepPlan
from server.engine.step_kernel import DecidedStep, StepTensors, decide_step, host_results, pack_results

logger = logging.getLogger(__name__)

_token_ids = attrgetter("token_ids")
_threshold = attrgetter("threshold")
_criterion_code = attrgetter("criterion_code")
_max_layers = attrgetter("max_layers")
_row_id = attrgetter("row_id")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class _CohortTensors:
    """Device state of one cohort; position i of every tensor belongs to ``row_ids[i]``."""

    row_ids: list[int]
    lengths: list[int]  # real tokens per row (host copy)
    hidden: torch.Tensor  # (rows, seq, hidden)
    mask: torch.Tensor  # (rows, seq) long
    layer_mask: torch.Tensor | None  # what every layer takes; None when no row has padding
    criterion_codes: torch.Tensor
    thresholds: torch.Tensor
    max_layers: torch.Tensor
    patience: PatienceState
    # Host-side facts that save device work (``compute_step``). Taking rows out of a cohort keeps both as
    # they are: a superset of the codes and a lower bound of the caps stay true of any subset.
    codes: frozenset[int]  # the criterion codes of the rows
    min_max_layers: int  # the smallest ``max_layers`` of the rows

    def select(self, positions: list[int], index: torch.Tensor, mask_optional: bool = True) -> _CohortTensors:
        """The rows at ``positions`` (``index`` holds them on the device), padding trimmed. The layer mask
        goes when no padding is left, if the encoder allows none (``EncoderAdapter.mask_optional``)."""
        lengths = [self.lengths[p] for p in positions]
        longest = max(lengths)
        layer_mask = None
        if self.layer_mask is not None and (min(lengths) < longest or not mask_optional):
            layer_mask = self.layer_mask.index_select(0, index)[..., :longest]
        return _CohortTensors(
            row_ids=[self.row_ids[p] for p in positions],
            lengths=lengths,
            hidden=self.hidden.index_select(0, index)[:, :longest],
            mask=self.mask.index_select(0, index)[:, :longest],
            layer_mask=layer_mask,
            criterion_codes=self.criterion_codes.index_select(0, index),
            thresholds=self.thresholds.index_select(0, index),
            max_layers=self.max_layers.index_select(0, index),
            patience=self.patience.select(index),
            codes=self.codes,
            min_max_layers=self.min_max_layers,
        )

    @staticmethod
    def concat(parts: list[_CohortTensors], model: EarlyExitClassifier) -> _CohortTensors:
        if len(parts) == 1:
            return parts[0]
        longest = max(p.hidden.shape[1] for p in parts)
        lengths = [n for p in parts for n in p.lengths]
        mask = torch.cat([F.pad(p.mask, (0, longest - p.mask.shape[1])) for p in parts])
        return _CohortTensors(
            row_ids=[r for p in parts for r in p.row_ids],
            lengths=lengths,
            hidden=torch.cat([F.pad(p.hidden, (0, 0, 0, longest - p.hidden.shape[1])) for p in parts]),
            mask=mask,
            layer_mask=model.layer_mask(mask, parts[0].hidden.dtype, padded=min(lengths) < longest),
            criterion_codes=torch.cat([p.criterion_codes for p in parts]),
            thresholds=torch.cat([p.thresholds for p in parts]),
            max_layers=torch.cat([p.max_layers for p in parts]),
            patience=PatienceState.concat([p.patience for p in parts]),
            codes=frozenset().union(*(p.codes for p in parts)),
            min_max_layers=min(p.min_max_layers for p in parts),
        )


class Runner:
    """Executes ``StepPlan``s on one model and device. Used by one worker thread only.

    ``cuda_graphs``: on a CUDA device, capture the layer steps up to ``max_batch_size`` rows and
    ``max_seq_length`` tokens at construction (``capture_report`` says how many, how long, how much
    memory). ``graph_backend`` replaces the CUDA backend (tests drive the graph path on CPU with it);
    ``graph_seq_buckets`` replaces the token buckets (a benchmark of fixed-length rows needs one).
    """

    def __init__(
        self,
        model: EarlyExitClassifier,
        device: str = "cpu",
        dtype: str = "float32",
        *,
        cuda_graphs: bool = False,
        max_batch_size: int = 64,
        max_seq_length: int | None = None,
        graph_backend: GraphBackend | None = None,
        graph_seq_buckets: tuple[int, ...] | None = None,
    ) -> None:
        if dtype != "float32" and not device.startswith("cuda"):
            raise ValueError(f"dtype {dtype} needs a CUDA device; on {device} use float32")
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        model = model.to(device=self.device).eval()
        model.ramps.float()  # the ramps stay float32 (exit decisions at full precision)
        if self.dtype != torch.float32:
            model.encoder.to(self.dtype)  # type: ignore[arg-type]
        self.model = model
        self.num_layers = model.num_layers
        self.pad_token_id = int(getattr(model.encoder.config, "pad_token_id", 0) or 0)
        self._pad_ids = array(TOKEN_ID_TYPECODE, (self.pad_token_id,))
        self._no_label = struct.pack("i", NO_LABEL)  # a row's last label before its first ramp (``_embed``)
        self._cuda = self.device.type == "cuda"
        self._cohorts: dict[int, _CohortTensors] = {}
        self.num_result_transfers = 0  # device-to-host transfers made (one per step that computed)
        # On a CPU with no graphs, reading the exit flags is no transfer: the step reads them first and
        # computes and reads the replies only when a row leaves (``step_kernel``).
        self._flags_first = not self._cuda and graph_backend is None
        self.graphs: GraphedSteps | None = None
        self.capture_report: CaptureReport | None = None
        if graph_backend is not None or (cuda_graphs and self._cuda):
            seq = max_seq_length or int(getattr(model.encoder.config, "max_position_embeddings", 512))
            backend = graph_backend if graph_backend is not None else CudaGraphBackend(self.device)
            self.graphs = GraphedSteps(
                model, max_batch_size, seq, self.dtype, self.device, backend, graph_seq_buckets
            )
            self.capture_report = self.graphs.capture_all()
            r = self.capture_report
            logger.info(
                "captured %d layer-step graphs (rows %s, tokens %s) in %.1f s, %.1f MiB",
                r.num_graphs, r.row_buckets, r.seq_buckets, r.seconds, r.memory_bytes / 2**20,
            )  # fmt: skip

    @property
    def num_cohorts(self) -> int:
        return len(self._cohorts)

    def reset(self) -> None:
        """Forget every cohort (after a failed step or an engine restart)."""
        self._cohorts.clear()

    def execute(self, plan: StepPlan) -> StepOutput:
        """Run ``plan``; returns the rows that exited and the survivors (now cohort ``out_cohort_id``).
        In inference mode: the core's loop runs in it (``EngineCore.run``), so the mode is entered here
        only for another caller (entering it costs a few us per step on a CPU)."""
        if torch.is_inference_mode_enabled():
            return self._execute(plan)
        with torch.inference_mode():
            return self._execute(plan)

    def _execute(self, plan: StepPlan) -> StepOutput:
        for cohort_id, row_ids in plan.dropped.items():
            self._remove(cohort_id, set(row_ids))
        parts: list[_CohortTensors] = []
        if plan.new_rows:
            parts.append(self._embed(list(plan.new_rows)))
        for cohort_id, row_ids in plan.sources.items():
            parts.append(self._take(cohort_id, row_ids))
        if not parts:
            return StepOutput(exited=(), survivors=())
        batch = _CohortTensors.concat(parts, self.model)
        layer = plan.layer
        self.num_result_transfers += 1
        if self._flags_first:
            return self._execute_on_host(plan, batch)
        step = self._compute(layer, batch)
        rows = self._fetch(step.packed)
        flags = [row[0] >= 0.5 for row in rows]
        labels = [int(row[1]) for row in rows]
        probs = [row[2:] for row in rows]
        return self._output(plan, batch, step.hidden, step.patience, flags, labels, probs)

    def _execute_on_host(self, plan: StepPlan, batch: _CohortTensors) -> StepOutput:
        """The step on a CPU, where reading a tensor is no transfer: the exit flags are read first (none
        at the last layer, where every row leaves); probabilities and labels are computed and read only
        when a row leaves, as two lists (``step_kernel.host_results``: the values the packed transfer
        holds, without packing them)."""
        layer = plan.layer
        decided = self._decide(layer, batch)
        flags: list[bool] | None = None if layer >= self.num_layers else decided.exits.tolist()
        if flags is not None and not plan.keep_probs and not any(flags):
            # Nobody leaves (most steps of a deep model): no probabilities, no labels, no copy.
            batch.hidden, batch.patience = decided.hidden, decided.patience
            self._cohorts[plan.out_cohort_id] = batch
            return StepOutput(
                exited=(),
                survivors=tuple(batch.row_ids),
                num_padded_tokens=int(batch.mask.shape[0] * batch.mask.shape[1]),
                num_real_tokens=sum(batch.lengths),
                survivors_longest=max(batch.lengths),
            )
        labels, probs = host_results(decided.logits)
        return self._output(plan, batch, decided.hidden, decided.patience, flags, labels, probs)

    def _output(
        self,
        plan: StepPlan,
        batch: _CohortTensors,
        hidden: torch.Tensor,
        patience: PatienceState,
        flags: list[bool] | None,
        labels: list[int],
        probs: list[list[float]],
    ) -> StepOutput:
        """The step's answers (``flags``: which rows leave, None = every row) and its survivors, who go
        on with ``hidden`` and ``patience`` as cohort ``plan.out_cohort_id``. A step where every row
        leaves (every step of a 1-layer model) builds its exit records in one pass; a step where none
        does keeps the cohort's tensors as they are (no copy)."""
        layer, row_ids = plan.layer, batch.row_ids
        num_padded_tokens = int(batch.mask.shape[0] * batch.mask.shape[1])
        if flags is None or all(flags):
            return StepOutput(
                exited=tuple(map(RowExit, row_ids, labels, probs, repeat(layer))),
                survivors=(),
                num_padded_tokens=num_padded_tokens,
                num_real_tokens=sum(batch.lengths),
            )
        keep = [p for p, leaves in enumerate(flags) if not leaves]
        exited = tuple(
            RowExit(row_ids[p], labels[p], probs[p], layer) for p, leaves in enumerate(flags) if leaves
        )
        batch.hidden, batch.patience = hidden, patience
        cohort = batch if len(keep) == len(flags) else self._select(batch, keep)
        self._cohorts[plan.out_cohort_id] = cohort
        return StepOutput(
            exited=exited,
            survivors=tuple(cohort.row_ids),
            num_padded_tokens=num_padded_tokens,
            num_real_tokens=sum(batch.lengths),
            survivor_probs=tuple(tuple(probs[p]) for p in keep) if plan.keep_probs else (),
            survivors_longest=max(cohort.lengths),
        )

    # --- helpers ----------------------------------------------------------------------------------

    def _compute(self, layer: int, batch: _CohortTensors) -> StepTensors:
        if self.graphs is not None:
            replayed = self.graphs.run(
                layer, batch.hidden, batch.mask, batch.criterion_codes, batch.thresholds, batch.max_layers,
                batch.patience,
            )  # fmt: skip
            if replayed is not None:
                return replayed
        decided = self._decide(layer, batch)  # what ``compute_step`` is: the decision, then the packing
        return StepTensors(decided.hidden, pack_results(decided.exits, decided.logits), decided.patience)

    def _decide(self, layer: int, batch: _CohortTensors) -> DecidedStep:
        return decide_step(
            self.model, layer, batch.hidden, batch.layer_mask, batch.mask, batch.criterion_codes,
            batch.thresholds, batch.max_layers, batch.patience,
            only_code=next(iter(batch.codes)) if len(batch.codes) == 1 else None,
            capped=batch.min_max_layers <= layer,
        )  # fmt: skip

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device: pinned and copied without blocking on CUDA, as is on CPU."""
        if not self._cuda:
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _fetch(self, packed: torch.Tensor) -> list[list[float]]:
        """The step's one device-to-host transfer: into pinned memory, then wait on an event."""
        if not self._cuda:
            rows: list[list[float]] = packed.tolist()
            return rows
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        rows = host.tolist()
        return rows

    def _select(self, cohort: _CohortTensors, positions: list[int]) -> _CohortTensors:
        index = self._to_device(torch.tensor(positions, dtype=torch.long))
        return cohort.select(positions, index, self.model.adapter.mask_optional)

    def _embed(self, rows: list[RowSpec]) -> _CohortTensors:
        """The step's new rows as tensors, from one flat int32 buffer: the thresholds (float32 bits),
        each row's token ids (padded), then lengths, criterion codes, caps and the patience state's
        start (as ``PatienceState.initial``: no label yet, none agreeing). Rows from the front ends
        hold their ids as ``array('i')`` (``messages.unpack_token_ids``), so the buffer is joined by
        memcpy, with no Python object per token; the per-row numbers are packed by ``struct`` in one
        call each (an ``array`` built from a list converts item by item: 4x slower at 64 rows). One
        copy to the device, and one conversion to long for everything after the thresholds (the ids,
        the codes, the caps and the patience state are views of it)."""
        num_rows = len(rows)
        ids_of = list(map(_token_ids, rows))
        lengths = list(map(len, ids_of))
        longest = max(lengths)
        padded = min(lengths) < longest
        codes = list(map(_criterion_code, rows))
        caps = list(map(_max_layers, rows))
        thresholds = struct.pack(f"{num_rows}f", *map(_threshold, rows))
        tail = struct.pack(f"{3 * num_rows}i", *lengths, *codes, *caps)
        ids = None
        if not padded:  # (the common case) every row is an ``array('i')``: joined as they are
            with contextlib.suppress(TypeError):  # a row held as a tuple or list of ints
                ids = bytearray().join(ids_of)
            if ids is not None and len(ids) != 4 * num_rows * longest:  # not int32 items: as below
                ids = None
        if ids is None:
            parts: list[Any] = []
            for row_ids, n in zip(ids_of, lengths, strict=True):
                parts.append(row_ids if type(row_ids) is array else array(TOKEN_ID_TYPECODE, row_ids))
                if n < longest:
                    parts.append(self._pad_ids * (longest - n))
            ids = bytearray().join(parts)
        patience = self._no_label * num_rows + bytes(4 * num_rows)  # as ``PatienceState.initial``
        buffer = bytearray().join((thresholds, ids, tail, patience))  # (writable: torch shares it as is)
        packed = self._to_device(torch.frombuffer(buffer, dtype=torch.int32))
        longs = packed[num_rows:].long()
        ids_end = num_rows * longest
        ids_ = longs[:ids_end].view(num_rows, longest)
        row_lengths, criterion_codes, max_layers, last_label, num_agreeing = (
            longs[ids_end:].view(5, num_rows).unbind()
        )
        if padded:
            mask = (torch.arange(longest, device=self.device) < row_lengths.unsqueeze(1)).long()
        else:
            mask = torch.ones((num_rows, longest), dtype=torch.long, device=self.device)
        hidden = self.model.embed(ids_, mask)
        return _CohortTensors(
            row_ids=list(map(_row_id, rows)),
            lengths=lengths,
            hidden=hidden,
            mask=mask,
            layer_mask=self.model.layer_mask(mask, hidden.dtype, padded=padded),
            criterion_codes=criterion_codes,
            thresholds=packed[:num_rows].view(torch.float32),
            max_layers=max_layers,
            patience=PatienceState(last_label=last_label, num_agreeing=num_agreeing),
            codes=frozenset(codes),
            min_max_layers=min(caps),
        )

    def _take(self, cohort_id: int, row_ids: tuple[int, ...]) -> _CohortTensors:
        """Remove ``row_ids`` from a cohort and return them as their own tensors."""
        cohort = self._cohorts[cohort_id]
        if list(row_ids) == cohort.row_ids:
            del self._cohorts[cohort_id]
            return cohort
        wanted = set(row_ids)
        taken = [p for p, r in enumerate(cohort.row_ids) if r in wanted]
        rest = [p for p, r in enumerate(cohort.row_ids) if r not in wanted]
        if rest:
            self._cohorts[cohort_id] = self._select(cohort, rest)
        else:
            del self._cohorts[cohort_id]
        return self._select(cohort, taken)

    def _remove(self, cohort_id: int, row_ids: set[int]) -> None:
        cohort = self._cohorts.get(cohort_id)
        if cohort is None:
            return
        rest = [p for p, r in enumerate(cohort.row_ids) if r not in row_ids]
        if rest:
            self._cohorts[cohort_id] = self._select(cohort, rest)
        else:
            del self._cohorts[cohort_id]
