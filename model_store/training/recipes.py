"""The four recipes. Each is a few stages of ``loop.train_loop`` over one ``TokenizedSet``.

* ``fastbert``: fine-tune backbone + final ramp (the teacher); freeze; train the other ramps by KL
  divergence to the teacher's soft labels (self-distillation: labels are not used in stage 2).
* ``deebert``: fine-tune backbone + final ramp; freeze; train the other ramps by cross-entropy.
* ``joint`` (PABEE): every ramp trained with the backbone, loss weighted by depth (k / sum k).
* ``distil``: fine-tune a teacher, build a student from every other teacher layer (DistilBERT), train it
  on soft targets at a temperature plus hard labels, then its ramps as in ``fastbert``.

Stages on a frozen backbone train on cached per-layer pooled features (``features.ramp_head``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from model_store.early_exit import EarlyExitClassifier
from model_store.training.features import (
    TokenizedSet,
    collect_pooled_features,
    collect_ramp_logits,
    length_sorted_batches,
    ramp_head,
)
from model_store.training.loop import LoopConfig, LoopStats, seed_everything, train_loop


@dataclass(frozen=True)
class Budget:
    """How much training each stage gets. ``None`` = all training rows."""

    max_finetune_examples: int | None = None
    finetune_epochs: float = 1.0
    finetune_batch_size: int = 16
    finetune_lr: float = 5e-5
    max_ramp_examples: int | None = None
    ramp_epochs: float = 10.0
    ramp_batch_size: int = 64
    ramp_lr: float = 1e-3
    distil_temperature: float = 2.0
    distil_alpha: float = 0.5  # weight of the soft-target loss; 1 - alpha on the hard labels
    freeze_word_embeddings: bool = True  # small data: keeps the vocabulary intact, and the steps cheaper
    # Fine-tuning's forward under bf16 autocast or not ("float32"); ramps, features, calibration and
    # serving stay float32. ``training.precision.resolve_precision`` turns "auto" into one of the two.
    finetune_precision: str = "float32"
    inference_batch_size: int = 32


@dataclass(frozen=True)
class TrainControl:
    """What bounds a run besides its budget: a dev set for early stopping (fine-tuning stops when the dev
    loss rises after an epoch, keeping the best epoch), and times (``time.time()``) by which the
    fine-tuning and the ramp stages stop (``--time-budget-min``)."""

    dev: TokenizedSet | None = None
    finetune_deadline_s: float | None = None
    ramps_deadline_s: float | None = None


@dataclass
class RecipeResult:
    """The trained model and what each stage did."""

    model: EarlyExitClassifier
    stages: dict[str, LoopStats] = field(default_factory=dict)


def _subset(data: TokenizedSet, max_rows: int | None, seed: int) -> TokenizedSet:
    if max_rows is None or max_rows >= len(data):
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(sorted(order[:max_rows].tolist()))


def _encoder_params(model: EarlyExitClassifier, budget: Budget) -> list[nn.Parameter]:
    frozen = {id(model.encoder.get_input_embeddings().weight)} if budget.freeze_word_embeddings else set()
    return [p for p in model.encoder.parameters() if id(p) not in frozen]


def _set_trainable(model: EarlyExitClassifier, params: list[nn.Parameter]) -> None:
    wanted = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)


def _final_logits(model: EarlyExitClassifier, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hidden = model.embed(ids, mask)
    for layer in range(1, model.num_layers + 1):
        hidden = model.run_layer(layer, hidden, mask)
    return model.ramp_logits(model.num_layers, hidden, mask)


def finetune_final(
    model: EarlyExitClassifier,
    data: TokenizedSet,
    budget: Budget,
    seed: int,
    show_progress: bool,
    desc: str = "fine-tune",
    soft_targets: torch.Tensor | None = None,
    control: TrainControl | None = None,
) -> LoopStats:
    """Train the backbone and the final ramp: cross-entropy, plus distillation when ``soft_targets``.

    ``soft_targets`` are teacher logits for ``data``'s rows (DistilBERT loss: alpha * T^2 * KL at
    temperature T + (1 - alpha) * cross-entropy).
    """
    params = _encoder_params(model, budget) + list(model.ramps[-1].parameters())
    _set_trainable(model, params)
    temperature, alpha = budget.distil_temperature, budget.distil_alpha

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        ids, mask = data.batch(rows)
        logits = _final_logits(model, ids, mask).float()  # float32 loss under bf16 autocast too
        hard = F.cross_entropy(logits, data.labels[rows])
        if soft_targets is None:
            return hard
        soft = F.kl_div(
            F.log_softmax(logits / temperature, dim=-1),
            F.softmax(soft_targets[rows] / temperature, dim=-1),
            reduction="batchmean",
        )
        return alpha * temperature**2 * soft + (1.0 - alpha) * hard

    control = control or TrainControl()
    config = LoopConfig(
        budget.finetune_epochs, budget.finetune_batch_size, budget.finetune_lr, seed=seed,
        deadline_s=control.finetune_deadline_s, precision=budget.finetune_precision,
    )  # fmt: skip
    dev = control.dev
    dev_loss = None
    if dev is not None and len(dev):

        def dev_loss() -> float:
            total = 0.0
            for rows in length_sorted_batches(dev, budget.inference_batch_size):
                ids, mask = dev.batch(rows)
                total += float(
                    F.cross_entropy(_final_logits(model, ids, mask), dev.labels[rows], reduction="sum")
                )
            return total / len(dev)

    return train_loop([model], params, len(data), batch_loss, config, desc, show_progress, dev_loss)


def train_ramps_frozen(
    model: EarlyExitClassifier,
    data: TokenizedSet,
    budget: Budget,
    seed: int,
    show_progress: bool,
    targets: Literal["labels", "teacher"],
    desc: str = "ramps",
    features: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    deadline_s: float | None = None,
) -> LoopStats:
    """Train ramps 1..L-1 on a frozen backbone from cached pooled features.

    ``targets="labels"``: cross-entropy on the labels (DeeBERT). ``targets="teacher"``: KL divergence to
    the final exit's soft labels (FastBERT self-distillation; labels unused). ``features`` and
    ``teacher_logits`` may come precomputed (an adopted checkpoint's head does not pool like a ramp).
    """
    if features is None:
        with tqdm(total=len(data), desc=f"{desc}: features", unit="row", disable=not show_progress) as bar:
            features = collect_pooled_features(model, data, budget.inference_batch_size, progress=bar)
    ramps = list(model.ramps[:-1])
    params = [p for ramp in ramps for p in ramp.parameters()]
    _set_trainable(model, params)
    with torch.no_grad():
        if teacher_logits is None:
            teacher_logits = ramp_head(model.ramps[-1], features[:, -1])
        teacher_probs = F.softmax(teacher_logits, dim=-1)

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        losses = []
        for k, ramp in enumerate(ramps):
            logits = ramp_head(ramp, features[rows, k])
            if targets == "labels":
                losses.append(F.cross_entropy(logits, data.labels[rows]))
            else:
                losses.append(
                    F.kl_div(F.log_softmax(logits, dim=-1), teacher_probs[rows], reduction="batchmean")
                )
        return torch.stack(losses).sum()

    config = LoopConfig(
        budget.ramp_epochs, budget.ramp_batch_size, budget.ramp_lr, warmup_fraction=0.0, seed=seed,
        deadline_s=deadline_s,
    )  # fmt: skip
    stats = train_loop(ramps, params, len(data), batch_loss, config, desc, show_progress)
    model.eval()
    return stats


def train_joint(
    model: EarlyExitClassifier,
    data: TokenizedSet,
    budget: Budget,
    seed: int,
    show_progress: bool,
    control: TrainControl | None = None,
) -> LoopStats:
    """PABEE: all ramps with the backbone; ramp k's cross-entropy weighted by k / sum(1..L)."""
    params = _encoder_params(model, budget) + [p for ramp in model.ramps for p in ramp.parameters()]
    _set_trainable(model, params)
    num_layers = model.num_layers
    weights = torch.arange(1, num_layers + 1, dtype=torch.float32)
    weights = weights / weights.sum()

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        ids, mask = data.batch(rows)
        labels = data.labels[rows]
        losses = torch.stack([F.cross_entropy(lg.float(), labels) for lg in model.all_ramp_logits(ids, mask)])
        return (weights * losses).sum()

    control = control or TrainControl()
    config = LoopConfig(
        budget.finetune_epochs, budget.finetune_batch_size, budget.finetune_lr, seed=seed,
        deadline_s=control.finetune_deadline_s, precision=budget.finetune_precision,
    )  # fmt: skip
    return train_loop([model], params, len(data), batch_loss, config, "joint", show_progress)


_LAYER_KEY = re.compile(r"^(encoder\.encoder\.layer)\.(\d+)\.(.*)$")
_RAMP_KEY = re.compile(r"^(ramps)\.(\d+)\.(.*)$")


def make_student(teacher: EarlyExitClassifier) -> EarlyExitClassifier:
    """A student with every other teacher layer (teacher layers 1, 3, 5, ... 1-based), initialised from
    them; ramp k from the teacher ramp after the same layer, the final ramp from the teacher's final."""
    keep = list(range(0, teacher.num_layers, 2))  # 0-based teacher layer indices
    config = copy.deepcopy(teacher.encoder.config)
    config.num_hidden_layers = len(keep)
    student = EarlyExitClassifier.from_config(config, teacher.num_labels, teacher.ramp_hidden)
    layer_map = {old: new for new, old in enumerate(keep)}
    ramp_map = {old: new for new, old in enumerate(keep[:-1])} | {teacher.num_layers - 1: len(keep) - 1}
    state: dict[str, torch.Tensor] = {}
    for key, value in teacher.state_dict().items():
        for pattern, mapping in ((_LAYER_KEY, layer_map), (_RAMP_KEY, ramp_map)):
            match = pattern.match(key)
            if match:
                old = int(match[2])
                if old in mapping:
                    state[f"{match[1]}.{mapping[old]}.{match[3]}"] = value.clone()
                break
        else:
            state[key] = value.clone()
    student.load_state_dict(state, strict=True)
    student.pair_separator_id = teacher.pair_separator_id
    return student.eval()


RecipeFn = Callable[[EarlyExitClassifier, TokenizedSet, Budget, int, bool, TrainControl], RecipeResult]


def _finetune_then_ramps(ramp_target: Literal["labels", "teacher"], stage_name: str) -> RecipeFn:
    """FastBERT / DeeBERT: fine-tune backbone + final ramp, freeze, then train the other ramps against
    ``ramp_target`` ("teacher": KL to the final ramp's soft labels; "labels": cross-entropy)."""

    def recipe(
        model: EarlyExitClassifier,
        data: TokenizedSet,
        budget: Budget,
        seed: int,
        show: bool,
        control: TrainControl,
    ) -> RecipeResult:
        tune = _subset(data, budget.max_finetune_examples, seed)
        stages = {"fine-tune": finetune_final(model, tune, budget, seed, show, control=control)}
        ramp_data = _subset(data, budget.max_ramp_examples, seed + 1)
        stages[stage_name] = train_ramps_frozen(
            model, ramp_data, budget, seed, show, ramp_target, deadline_s=control.ramps_deadline_s
        )
        return RecipeResult(model, stages)

    return recipe


def _joint(
    model: EarlyExitClassifier,
    data: TokenizedSet,
    budget: Budget,
    seed: int,
    show: bool,
    control: TrainControl,
) -> RecipeResult:
    tune = _subset(data, budget.max_finetune_examples, seed)
    return RecipeResult(model, {"joint": train_joint(model, tune, budget, seed, show, control)})


def _distil(
    teacher: EarlyExitClassifier,
    data: TokenizedSet,
    budget: Budget,
    seed: int,
    show: bool,
    control: TrainControl,
) -> RecipeResult:
    tune = _subset(data, budget.max_finetune_examples, seed)
    stages = {
        "teacher fine-tune": finetune_final(
            teacher, tune, budget, seed, show, desc="teacher", control=control
        )
    }
    teacher_logits = collect_ramp_logits(teacher, tune, budget.inference_batch_size)[:, -1]
    student = make_student(teacher)
    stages["student distillation"] = finetune_final(
        student, tune, budget, seed, show, desc="student", soft_targets=teacher_logits, control=control
    )
    ramp_data = _subset(data, budget.max_ramp_examples, seed + 1)
    stages["ramps (KL to student)"] = train_ramps_frozen(
        student, ramp_data, budget, seed, show, "teacher", deadline_s=control.ramps_deadline_s
    )
    return RecipeResult(student, stages)


RECIPES: dict[str, RecipeFn] = {
    "fastbert": _finetune_then_ramps("teacher", "ramps (KL to teacher)"),
    "deebert": _finetune_then_ramps("labels", "ramps (CE)"),
    "joint": _joint,
    "distil": _distil,
}


def train_recipe(
    name: str,
    model: EarlyExitClassifier,
    data: TokenizedSet,
    budget: Budget,
    seed: int = 0,
    show_progress: bool = True,
    control: TrainControl | None = None,
) -> RecipeResult:
    """Run recipe ``name`` on ``model`` (changed in place; ``distil`` returns a new, shallower model)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    seed_everything(seed)
    result = RECIPES[name](model, data, budget, seed, show_progress, control or TrainControl())
    for p in result.model.parameters():
        p.requires_grad_(False)
    result.model.eval()
    return result
