"""The runner computes what the scheduler planned: one layer, its ramp and the exit decision per row.

It keeps each cohort's hidden states on the device between steps, merges cohorts (re-padding to the
longest row), removes exited rows by index and trims padding no remaining row needs. Per step there is
exactly one device-to-host transfer: the packed exit mask and probabilities of that step (the replies of
the rows that exited must go out, so this one is unavoidable). Row lengths are tracked on the host, so
trimming never synchronises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_store.criteria import PatienceState, decide_exits
from model_store.early_exit import EarlyExitClassifier
from server.engine.scheduler import RowExit, RowSpec, StepOutput, StepPlan

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class _CohortTensors:
    """Device state of one cohort; position i of every tensor belongs to ``row_ids[i]``."""

    row_ids: list[int]
    lengths: list[int]  # real tokens per row (host copy)
    hidden: torch.Tensor  # (rows, seq, hidden)
    mask: torch.Tensor  # (rows, seq) long
    criterion_codes: torch.Tensor
    thresholds: torch.Tensor
    max_layers: torch.Tensor
    patience: PatienceState

    def select(self, positions: list[int]) -> _CohortTensors:
        device = self.hidden.device
        index = torch.tensor(positions, dtype=torch.long, device=device)
        longest = max(self.lengths[p] for p in positions)
        return _CohortTensors(
            row_ids=[self.row_ids[p] for p in positions],
            lengths=[self.lengths[p] for p in positions],
            hidden=self.hidden.index_select(0, index)[:, :longest],
            mask=self.mask.index_select(0, index)[:, :longest],
            criterion_codes=self.criterion_codes.index_select(0, index),
            thresholds=self.thresholds.index_select(0, index),
            max_layers=self.max_layers.index_select(0, index),
            patience=self.patience.select(index),
        )

    @staticmethod
    def concat(parts: list[_CohortTensors]) -> _CohortTensors:
        if len(parts) == 1:
            return parts[0]
        longest = max(p.hidden.shape[1] for p in parts)
        return _CohortTensors(
            row_ids=[r for p in parts for r in p.row_ids],
            lengths=[n for p in parts for n in p.lengths],
            hidden=torch.cat([F.pad(p.hidden, (0, 0, 0, longest - p.hidden.shape[1])) for p in parts]),
            mask=torch.cat([F.pad(p.mask, (0, longest - p.mask.shape[1])) for p in parts]),
            criterion_codes=torch.cat([p.criterion_codes for p in parts]),
            thresholds=torch.cat([p.thresholds for p in parts]),
            max_layers=torch.cat([p.max_layers for p in parts]),
            patience=PatienceState.concat([p.patience for p in parts]),
        )


class Runner:
    """Executes ``StepPlan``s on one model and device. Used by one worker thread only."""

    def __init__(self, model: EarlyExitClassifier, device: str = "cpu", dtype: str = "float32") -> None:
        if dtype != "float32" and not device.startswith("cuda"):
            raise ValueError(f"dtype {dtype} needs a CUDA device; on {device} use float32")
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.num_layers = model.num_layers
        self.pad_token_id = int(getattr(model.encoder.config, "pad_token_id", 0) or 0)
        self._cohorts: dict[int, _CohortTensors] = {}

    @property
    def num_cohorts(self) -> int:
        return len(self._cohorts)

    def reset(self) -> None:
        """Forget every cohort (after a failed step or an engine restart)."""
        self._cohorts.clear()

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepOutput:
        """Run ``plan``; returns the rows that exited and the survivors (now cohort ``out_cohort_id``)."""
        for cohort_id, row_ids in plan.dropped.items():
            self._remove(cohort_id, set(row_ids))
        parts: list[_CohortTensors] = []
        if plan.new_rows:
            parts.append(self._embed(list(plan.new_rows)))
        for cohort_id, row_ids in plan.sources.items():
            parts.append(self._take(cohort_id, row_ids))
        if not parts:
            return StepOutput(exited=(), survivors=())
        batch = _CohortTensors.concat(parts)

        hidden = self.model.run_layer(plan.layer, batch.hidden, batch.mask)
        logits = self.model.ramp_logits(plan.layer, hidden, batch.mask)
        exits, patience = decide_exits(logits, batch.criterion_codes, batch.thresholds, batch.patience)
        exits = exits | (batch.max_layers <= plan.layer)
        if plan.layer >= self.num_layers:
            exits = torch.ones_like(exits)
        probs = torch.softmax(logits.float(), dim=-1)
        packed = torch.cat([exits.to(probs.dtype).unsqueeze(1), probs], dim=1).cpu()  # the one sync

        exited: list[RowExit] = []
        keep: list[int] = []
        kept_probs: list[tuple[float, ...]] = []
        for position, row in enumerate(packed.tolist()):
            if row[0] > 0.5:
                row_probs = tuple(row[1:])
                label_index = max(range(len(row_probs)), key=row_probs.__getitem__)
                exited.append(RowExit(batch.row_ids[position], label_index, row_probs, plan.layer))
            else:
                keep.append(position)
                if plan.keep_probs:
                    kept_probs.append(tuple(row[1:]))
        if keep:
            batch.hidden, batch.patience = hidden, patience
            self._cohorts[plan.out_cohort_id] = batch.select(keep)
        return StepOutput(
            exited=tuple(exited),
            survivors=tuple(batch.row_ids[p] for p in keep),
            num_padded_tokens=int(batch.mask.shape[0] * batch.mask.shape[1]),
            survivor_probs=tuple(kept_probs),
        )

    # --- helpers ----------------------------------------------------------------------------------

    def _embed(self, rows: list[RowSpec]) -> _CohortTensors:
        """The step's new rows as tensors: each built by one call from Python lists, not row by row."""
        lengths = [r.num_tokens for r in rows]
        longest = max(lengths)
        pad = (self.pad_token_id,)
        ids = torch.tensor([r.token_ids + pad * (longest - n) for r, n in zip(rows, lengths, strict=True)])
        mask = (torch.arange(longest) < torch.tensor(lengths).unsqueeze(1)).long()
        ids, mask = ids.to(self.device), mask.to(self.device)
        device = self.device
        return _CohortTensors(
            row_ids=[r.row_id for r in rows],
            lengths=lengths,
            hidden=self.model.embed(ids, mask),
            mask=mask,
            criterion_codes=torch.tensor([r.criterion_code for r in rows], dtype=torch.long, device=device),
            thresholds=torch.tensor([r.threshold for r in rows], dtype=torch.float32, device=device),
            max_layers=torch.tensor([r.max_layers for r in rows], dtype=torch.long, device=device),
            patience=PatienceState.initial(len(rows), device=device),
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
            self._cohorts[cohort_id] = cohort.select(rest)
        else:
            del self._cohorts[cohort_id]
        return cohort.select(taken)

    def _remove(self, cohort_id: int, row_ids: set[int]) -> None:
        cohort = self._cohorts.get(cohort_id)
        if cohort is None:
            return
        rest = [p for p, r in enumerate(cohort.row_ids) if r not in row_ids]
        if rest:
            self._cohorts[cohort_id] = cohort.select(rest)
        else:
            del self._cohorts[cohort_id]
