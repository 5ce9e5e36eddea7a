"""Every recipe trains a tiny model on a tiny synthetic task, and its ramps beat chance."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from model_store.early_exit import EarlyExitClassifier
from model_store.training import RECIPES, Budget, train_recipe
from model_store.training.features import TokenizedSet, collect_ramp_logits, ramp_head
from model_store.training.recipes import make_student
from tests.model_store.conftest import VOCAB, padded_batch, tiny_model

NUM_LABELS = 3
TINY_BUDGET = Budget(
    finetune_epochs=5.0,
    finetune_batch_size=16,
    finetune_lr=5e-3,
    freeze_word_embeddings=False,
    ramp_epochs=20.0,
    ramp_batch_size=32,
    ramp_lr=1e-2,
    inference_batch_size=64,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models gain nothing from a second thread, and on a shared 2-core machine its spin-waits cost.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def synthetic_task(num_rows: int, seed: int) -> TokenizedSet:
    """Label c draws its tokens from the c-th third of the vocabulary; lengths vary from 4 to 12."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_LABELS, (num_rows,), generator=gen)
    band = (VOCAB - 6) // NUM_LABELS
    rows = []
    for label in labels.tolist():
        length = int(torch.randint(4, 13, (1,), generator=gen))
        rows.append(torch.randint(6 + label * band, 6 + (label + 1) * band, (length,), generator=gen))
    return TokenizedSet(rows, labels, [str(x) for x in labels.tolist()], pad_token_id=0)


def ramp_accuracy(model: EarlyExitClassifier, data: TokenizedSet) -> list[float]:
    logits = collect_ramp_logits(model, data, batch_size=64)
    return [float(v) for v in (logits.argmax(-1) == data.labels.view(-1, 1)).float().mean(0)]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_ramps_beat_chance(recipe: str) -> None:
    train, held_out = synthetic_task(96, seed=1), synthetic_task(96, seed=2)
    model = tiny_model("bert", num_labels=NUM_LABELS, seed=0)
    before = ramp_accuracy(model, held_out)
    result = train_recipe(recipe, model, train, TINY_BUDGET, seed=0, show_progress=False)
    after = ramp_accuracy(result.model, held_out)
    expected_layers = 2 if recipe == "distil" else 4
    assert result.model.num_layers == expected_layers
    assert min(after) >= 0.8, (recipe, before, after)  # chance is 1/3
    assert all(s.num_steps > 0 for s in result.stages.values())
    assert not any(p.requires_grad for p in result.model.parameters())


def test_training_is_repeatable_with_a_seed() -> None:
    train = synthetic_task(64, seed=1)
    budget = Budget(finetune_epochs=1.0, ramp_epochs=2.0, finetune_lr=1e-3)
    states = []
    for _ in range(2):
        model = train_recipe(
            "deebert", tiny_model("bert", NUM_LABELS), train, budget, seed=5, show_progress=False
        )
        states.append(model.model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_frozen_ramp_stage_leaves_backbone_and_final_ramp_alone() -> None:
    train = synthetic_task(64, seed=1)
    model = tiny_model("bert", NUM_LABELS)
    budget = Budget(finetune_epochs=1e-9, ramp_epochs=2.0)  # one fine-tuning step, then the ramps
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from model_store.training.recipes import train_ramps_frozen

    train_ramps_frozen(model, train, budget, seed=0, show_progress=False, targets="teacher")
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("ramps.0.", "ramps.1.", "ramps.2.")) for k in changed)


def test_ramp_head_equals_the_ramp_on_pooled_states() -> None:
    model = tiny_model("bert", NUM_LABELS)
    ids, mask = padded_batch([3, 7, 5], pad_id=0)
    with torch.no_grad():
        hidden = model.run_layer(1, model.embed(ids, mask), mask)
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(ramp_head(model.ramps[0], pooled), model.ramps[0](hidden, mask))


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_student_takes_every_other_teacher_layer(kind: str) -> None:
    teacher = tiny_model(kind, NUM_LABELS)
    student = make_student(teacher)
    assert student.num_layers == 2
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for new, old in ((0, 0), (1, 2)):
        for key in (k for k in s_state if k.startswith(f"encoder.encoder.layer.{new}.")):
            assert torch.equal(s_state[key], t_state[key.replace(f"layer.{new}.", f"layer.{old}.")])
    assert torch.equal(s_state["ramps.0.out.weight"], t_state["ramps.0.out.weight"])
    assert torch.equal(s_state["ramps.1.out.weight"], t_state["ramps.3.out.weight"])  # the final ramp


@pytest.mark.parametrize("recipe", ["fastbert", "joint"])
def test_bf16_fine_tuning_trains_float32_weights_and_the_ramps_still_learn(recipe: str) -> None:
    train, held_out = synthetic_task(96, seed=1), synthetic_task(96, seed=2)
    model = tiny_model("bert", num_labels=NUM_LABELS, seed=0)
    budget = dataclasses.replace(TINY_BUDGET, finetune_precision="bfloat16")
    result = train_recipe(recipe, model, train, budget, seed=0, show_progress=False)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert min(ramp_accuracy(result.model, held_out)) >= 0.8  # chance is 1/3


def test_bf16_fine_tuning_differs_from_float32() -> None:
    # The autocast really runs: the same seed in bf16 gives other weights than in float32.
    train = synthetic_task(64, seed=1)
    states = []
    for precision in ("float32", "bfloat16"):
        budget = Budget(finetune_epochs=1.0, ramp_epochs=1.0, finetune_lr=1e-3, finetune_precision=precision)
        model = train_recipe(
            "fastbert", tiny_model("bert", NUM_LABELS), train, budget, seed=5, show_progress=False
        )
        states.append(model.model.state_dict())
    name = "encoder.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(states[0][name], states[1][name])
    torch.testing.assert_close(states[0][name], states[1][name], atol=0.05, rtol=0.0)


def test_an_unknown_precision_is_refused() -> None:
    budget = dataclasses.replace(TINY_BUDGET, finetune_precision="float16")
    with pytest.raises(ValueError, match="float16"):
        train_recipe("fastbert", tiny_model("bert", NUM_LABELS), synthetic_task(16, 1), budget, 0, False)


def test_auto_precision_is_bf16_only_on_a_cpu_with_bf16_instructions() -> None:
    from model_store.training.precision import resolve_precision

    assert resolve_precision("auto", frozenset({"avx2", "avx512_bf16"})) == "bfloat16"
    assert resolve_precision("auto", frozenset({"avx2", "amx_bf16", "amx_tile"})) == "bfloat16"
    assert resolve_precision("auto", frozenset({"avx2", "avx512_vnni"})) == "float32"
    assert resolve_precision("auto", frozenset()) == "float32"
    assert resolve_precision("float32", frozenset({"avx512_bf16"})) == "float32"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16")
