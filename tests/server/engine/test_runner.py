"""The runner (eager and through the graph cache) gives every row what the reference forward gives it.

Rows of mixed lengths and exit policies go through the real scheduler in refill mode, so cohorts merge,
shrink and are trimmed; each row's answer must equal ``early_exit_forward`` on that row alone.
"""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import create_bidirectional_mask

from model_store.criteria import CRITERION_CODES, Criterion, threshold_for
from model_store.early_exit import EarlyExitClassifier
from model_store.reference import RowPolicies, early_exit_forward
from server.engine import runner as runner_module
from server.engine.graphs import EagerReplayBackend, bucket_for, row_buckets, seq_buckets
from server.engine.messages import pack_token_ids, unpack_token_ids
from server.engine.runner import Runner, _CohortTensors
from server.engine.scheduler import RowExit, RowSpec, Scheduler, SchedulerConfig
from server.engine.step_kernel import host_results
from tests.model_store.conftest import KINDS, padded_batch, tiny_config, tiny_model

pytestmark = pytest.mark.model

LENGTHS = [3, 11, 7, 2, 12, 5, 9, 4, 8, 6, 10, 1, 12, 12]
CRITERIA = (list(Criterion) * 4)[: len(LENGTHS)]
SPEEDS = [0.0, 0.7, 0.75, 0.5, 0.8, 0.85, 0.9, 1.0, 0.65, 0.3, 0.72, 0.68, 0.6, 0.0]
MAX_LAYERS = [None, None, 3, None, 2, None, None, None, None, 1, None, None, None, 2]


def _sharpened(kind: str) -> EarlyExitClassifier:
    model = tiny_model(kind, num_labels=3, seed=3)
    with torch.no_grad():  # random ramps are near-uniform: spread confidences so rows exit at several layers
        for ramp in model.ramps:
            ramp.out.weight.mul_(10.0)
    return model


def _rows(model: EarlyExitClassifier, ids: torch.Tensor, wire: bool = True) -> list[RowSpec]:
    """The rows as the core admits them: token ids as they come off the wire (int32 arrays), or, with
    ``wire=False``, as tuples (the shadow sampler's and calibration's rows; the runner converts)."""
    rows = []
    for i, n in enumerate(LENGTHS):
        c = CRITERIA[i]
        row_ids = ids[i, :n].tolist()
        rows.append(
            RowSpec(
                row_id=i + 1,
                request_id=i + 1,
                token_ids=unpack_token_ids(pack_token_ids(row_ids)) if wire else tuple(row_ids),
                criterion_code=CRITERION_CODES[c],
                threshold=threshold_for(c, SPEEDS[i], model.num_labels, model.num_layers),
                max_layers=model.num_layers if MAX_LAYERS[i] is None else MAX_LAYERS[i],
            )
        )
    return rows


def _serve(runner: Runner, rows: list[RowSpec], batch_size: int) -> dict[int, RowExit]:
    scheduler = Scheduler(
        SchedulerConfig(max_batch_size=batch_size, max_wait_ms=0.0, num_layers=runner.num_layers)
    )
    answers: dict[int, RowExit] = {}
    pending = list(rows)
    now = 0.0
    while pending or scheduler.has_work():
        if pending:  # one request per step, so new rows keep joining cohorts in flight
            scheduler.add_rows([pending.pop(0)], now)
        now += 1.0
        plan = scheduler.schedule(now).plan
        if plan is None:
            continue
        for _, row_exit in scheduler.update_from_output(plan, runner.execute(plan)):
            answers[row_exit.row_id] = row_exit
    return answers


def _reference(model: EarlyExitClassifier, ids: torch.Tensor, mask: torch.Tensor) -> list:
    policies = RowPolicies.from_rows(CRITERIA, SPEEDS, MAX_LAYERS, model.num_labels, model.num_layers)
    out = []
    for row, n in enumerate(LENGTHS):
        alone = policies.select(torch.tensor([row]))
        out.append(early_exit_forward(model, ids[row : row + 1, :n], mask[row : row + 1, :n], alone)[0])
    return out


def _check(answers: dict[int, RowExit], reference: list) -> None:
    assert len(answers) == len(LENGTHS)
    for row, want in enumerate(reference):
        got = answers[row + 1]
        assert got.exit_layer == want.exit_layer, f"row {row}"
        assert got.label_index == want.label_index, f"row {row}"
        assert max(abs(a - b) for a, b in zip(got.probs, want.probs, strict=True)) <= 1e-5, f"row {row}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-cache"])
def test_runner_matches_reference_rows_alone(kind: str, graphs: bool) -> None:
    model = _sharpened(kind)
    pad = model.encoder.config.pad_token_id or 0
    ids, mask = padded_batch(LENGTHS, pad_id=pad, seed=5)
    reference = _reference(model, ids, mask)
    assert len({r.exit_layer for r in reference}) >= 3, "the rows must leave at several layers"
    backend = EagerReplayBackend() if graphs else None
    runner = Runner(model, max_batch_size=8, max_seq_length=12, graph_backend=backend)
    answers = _serve(runner, _rows(model, ids), batch_size=8)
    _check(answers, reference)
    if graphs:
        assert runner.graphs is not None and runner.capture_report is not None
        report = runner.capture_report
        assert report.num_graphs == model.num_layers * len(row_buckets(8)) * len(seq_buckets(12))
        assert backend is not None and backend.num_captured == report.num_graphs
        assert runner.graphs.num_replays > 0


def test_graph_steps_beyond_the_buckets_run_eagerly() -> None:
    model = _sharpened("bert")
    ids, mask = padded_batch(LENGTHS, pad_id=0, seed=5)
    runner = Runner(model, max_batch_size=2, max_seq_length=4, graph_backend=EagerReplayBackend())
    answers = _serve(runner, _rows(model, ids, wire=False), batch_size=8)  # steps of <= 8 rows, 12 tokens
    _check(answers, _reference(model, ids, mask))
    assert runner.graphs is not None and runner.graphs.num_replays > 0  # the short, small steps


def test_one_result_transfer_per_step_and_no_copy_when_nobody_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("bert", num_labels=2)
    selects: list[int] = []
    packs: list[int] = []

    class Counting(Runner):
        def _select(self, cohort: _CohortTensors, positions: list[int]) -> _CohortTensors:
            selects.append(len(positions))
            return super()._select(cohort, positions)

    def counted_results(logits: torch.Tensor) -> tuple[list[int], list[list[float]]]:
        packs.append(int(logits.shape[0]))
        return host_results(logits)

    monkeypatch.setattr(runner_module, "host_results", counted_results)

    runner = Counting(model)
    rows = [
        RowSpec(i, i, tuple(range(5, 5 + n)), CRITERION_CODES[Criterion.NORMALIZED_ENTROPY], 0.0, 4)
        for i, n in ((1, 6), (2, 3), (3, 9))
    ]  # speed 0: nobody leaves before the last layer
    scheduler = Scheduler(SchedulerConfig(max_batch_size=8, max_wait_ms=0.0, num_layers=4))
    scheduler.add_rows(rows, 0.0)
    steps = 0
    while scheduler.has_work():
        plan = scheduler.schedule(1.0).plan
        assert plan is not None
        scheduler.update_from_output(plan, runner.execute(plan))
        steps += 1
    assert steps == 4
    assert runner.num_result_transfers == steps
    assert selects == []
    # On a CPU the exit flags are read first: the probabilities and labels are computed and read only at
    # the step where the rows leave (the last layer here), not at the three that carry them on.
    assert packs == [3]


@pytest.mark.parametrize("kind", ["bert", "albert"])
def test_reading_the_flags_first_answers_as_the_packed_transfer_does(kind: str) -> None:
    """The CPU runner's flags-first step and the one packed transfer (a GPU's, and the graphs') give the
    same answers bit for bit: the same decisions, labels and probabilities."""
    model = _sharpened(kind)
    ids, _ = padded_batch(LENGTHS, pad_id=int(model.encoder.config.pad_token_id or 0), seed=5)
    flags_first = Runner(model)
    packed = Runner(model)
    assert flags_first._flags_first
    packed._flags_first = False
    a = _serve(flags_first, _rows(model, ids), batch_size=8)
    b = _serve(packed, _rows(model, ids), batch_size=8)
    assert len({r.exit_layer for r in a.values()}) >= 3, "the rows must leave at several layers"
    assert a == b


def test_buckets() -> None:
    assert row_buckets(64) == (1, 2, 4, 8, 16, 32, 48, 64)
    assert row_buckets(512)[-4:] == (192, 256, 384, 512)
    assert row_buckets(100) == (1, 2, 4, 8, 16, 32, 48, 64, 96, 100)
    assert row_buckets(1) == (1,)
    assert seq_buckets(64) == (16, 32, 64)
    assert seq_buckets(100) == (16, 32, 64, 100)
    assert seq_buckets(8) == (8,)
    assert bucket_for(33, row_buckets(64)) == 48
    assert bucket_for(65, row_buckets(64)) is None
    assert bucket_for(1, seq_buckets(64)) == 16


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layer_mask_equals_the_library_mask(attn: str) -> None:
    config = tiny_config("bert")
    config._attn_implementation = attn
    model = EarlyExitClassifier.from_config(config, 2, ramp_hidden=8)
    ids, mask = padded_batch([5, 2, 7], pad_id=0)
    hidden = model.embed(ids, mask)
    library = create_bidirectional_mask(
        config=model.encoder.config, inputs_embeds=hidden, attention_mask=mask
    )
    ours = model.layer_mask(mask, hidden.dtype)
    assert library is not None and ours is not None
    assert torch.equal(ours.expand_as(library), library)
    assert model.layer_mask(torch.ones(2, 3, dtype=torch.long), hidden.dtype, padded=False) is None


def test_half_precision_needs_cuda() -> None:
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Runner(tiny_model("bert"), dtype="float16")
