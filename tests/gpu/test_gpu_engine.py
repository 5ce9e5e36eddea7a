"""The engine's GPU path: no hidden syncs, half precision that agrees with float32, graphs == eager."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from model_store.criteria import CRITERION_CODES, Criterion, threshold_for
from model_store.early_exit import EarlyExitClassifier
from model_store.store import LoadedModel
from model_store.tokens import RowTokenizer
from server.engine.runner import Runner
from server.engine.scheduler import RowExit, RowSpec, Scheduler, SchedulerConfig

pytestmark = pytest.mark.gpu
DEVICE = "cuda"  # a CPU dry run of these helpers may set "cpu"


def _tiny_sharpened() -> EarlyExitClassifier:
    from transformers import BertConfig

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=256
    )
    model = EarlyExitClassifier.from_config(config, 3, ramp_hidden=16).eval()
    with torch.no_grad():  # random ramps are near-uniform: spread confidences so rows exit at several layers
        for ramp in model.ramps:
            ramp.out.weight.mul_(12.0)
    return model


def _mixed_rows(model: EarlyExitClassifier, num_rows: int, max_len: int, seed: int = 0) -> list[RowSpec]:
    rng = random.Random(seed)
    rows = []
    for i in range(num_rows):
        criterion = rng.choice(list(Criterion))
        speed = rng.choice([0.0, 0.3, 0.6, 0.8, 0.9])
        n = rng.randint(1, max_len)
        rows.append(
            RowSpec(
                row_id=i + 1,
                request_id=i + 1,
                token_ids=tuple(rng.randrange(1000, 29000) for _ in range(n)),
                criterion_code=CRITERION_CODES[criterion],
                threshold=threshold_for(criterion, speed, model.num_labels, model.num_layers),
                max_layers=rng.choice([model.num_layers, model.num_layers, 2]),
            )
        )
    return rows


def _serve(runner: Runner, rows: list[RowSpec], batch_size: int = 16) -> tuple[dict[int, RowExit], int]:
    """One request per step joins, so cohorts merge, shrink and trim as in serving. Returns the answers
    and the number of steps that computed."""
    scheduler = Scheduler(
        SchedulerConfig(max_batch_size=batch_size, max_wait_ms=0.0, num_layers=runner.num_layers)
    )
    pending, answers, steps, now = list(rows), {}, 0, 0.0
    while pending or scheduler.has_work():
        for _ in range(3):
            if pending:
                scheduler.add_rows([pending.pop(0)], now)
        now += 1.0
        plan = scheduler.schedule(now).plan
        if plan is None:
            continue
        output = runner.execute(plan)
        steps += 1 if plan.num_rows else 0
        for _, row_exit in scheduler.update_from_output(plan, output):
            answers[row_exit.row_id] = row_exit
    return answers, steps


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_step_loop_has_one_device_sync_per_step(graphs: bool) -> None:
    model = _tiny_sharpened()
    rows = _mixed_rows(model, 120, max_len=48)
    reference, _ = _serve(Runner(_tiny_sharpened()), rows)
    runner = Runner(model, device=DEVICE, cuda_graphs=graphs, max_batch_size=16, max_seq_length=48)
    _serve(runner, rows[:8])  # warm-up (first kernels, allocator)
    runner.num_result_transfers = 0
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises, except the event wait
    try:
        answers, steps = _serve(runner, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert runner.num_result_transfers == steps
    assert len({a.exit_layer for a in answers.values()}) >= 3, "rows must leave at several layers"
    if graphs:
        assert runner.graphs is not None and runner.graphs.num_replays > 0
    same = sum(answers[r].exit_layer == reference[r].exit_layer for r in reference)
    assert same >= 0.98 * len(reference)
    assert sum(answers[r].label_index == reference[r].label_index for r in reference) >= 0.98 * len(reference)


def _full_depth(loaded: LoadedModel, texts: list[str], dtype: str, graphs: bool = False) -> torch.Tensor:
    tokenizer = RowTokenizer(loaded.tokenizer, loaded.manifest.max_seq_length)
    runner = Runner(
        copy.deepcopy(loaded.model), device=DEVICE, dtype=dtype, cuda_graphs=graphs, max_batch_size=64,
        max_seq_length=loaded.manifest.max_seq_length,
    )  # fmt: skip
    layers = loaded.manifest.num_layers
    rows = [
        RowSpec(i + 1, i + 1, tuple(ids), CRITERION_CODES[Criterion.NORMALIZED_ENTROPY], 0.0, layers)
        for i, (ids, _) in enumerate(tokenizer(texts))
    ]
    answers, _ = _serve(runner, rows, batch_size=64)
    return torch.tensor([answers[r.row_id].probs for r in rows])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_agrees_with_float32_on_the_test_split(
    real_model: LoadedModel, test_texts: list[str], dtype: str
) -> None:
    float32 = _full_depth(real_model, test_texts, "float32")
    half = _full_depth(real_model, test_texts, dtype)
    agreement = (float32.argmax(-1) == half.argmax(-1)).float().mean().item()
    max_delta = (float32 - half).abs().max().item()
    print(
        f"{dtype}: label agreement {agreement:.4f}, max |dprob| {max_delta:.2e} over {len(test_texts)} rows"
    )
    assert agreement >= 0.995
    assert max_delta <= 1e-2


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_graph_replay_gives_the_answers_of_eager(
    real_model: LoadedModel, test_texts: list[str], dtype: str
) -> None:
    texts = test_texts[:256]
    eager = _full_depth(real_model, texts, dtype, graphs=False)
    graphed = _full_depth(real_model, texts, dtype, graphs=True)
    assert torch.equal(eager.argmax(-1), graphed.argmax(-1))
    assert (eager - graphed).abs().max().item() <= (1e-4 if dtype == "float32" else 2e-3)
