"""The one training loop every recipe uses: shuffled row batches -> loss -> AdamW step, with tqdm."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


def seed_everything(seed: int) -> None:
    """Fix Python, NumPy and torch seeds (training is then repeatable on one machine)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation settings of one training stage."""

    num_epochs: float = 1.0
    batch_size: int = 16
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06
    max_grad_norm: float = 1.0
    seed: int = 0
    deadline_s: float | None = None  # time.time() by which the stage stops (a run's --time-budget-min)
    # "bfloat16": forward and loss under CPU autocast (bf16 matmuls, float32 weights, optimizer and
    # gradients' accumulation); worth it only where the CPU has bf16 instructions (training.precision).
    precision: str = "float32"


@dataclass(frozen=True)
class LoopStats:
    """What a stage did: steps, rows seen, seconds, first and last smoothed loss."""

    num_steps: int
    num_rows_seen: int
    duration_s: float
    first_loss: float
    final_loss: float
    stopped: str | None = None  # why it ended before num_epochs: "dev loss rose" or "time budget"
    dev_losses: tuple[float, ...] = ()  # after each epoch, when a dev set is given


def train_loop(
    modules: Iterable[nn.Module],
    params: list[nn.Parameter],
    num_rows: int,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    config: LoopConfig,
    desc: str,
    show_progress: bool = True,
    dev_loss: Callable[[], float] | None = None,
) -> LoopStats:
    """Train ``params`` for ``config.num_epochs`` passes over ``num_rows`` rows.

    ``batch_loss(rows)`` gets a 1-D tensor of row indices and returns the scalar loss of that batch;
    ``modules`` are put in train mode (everything else stays as the caller left it). Linear warmup then
    linear decay; gradients clipped to ``max_grad_norm``.

    Early stopping: with ``dev_loss`` (evaluated in eval mode after every epoch), training stops when the
    dev loss is higher than after the previous epoch, and the parameters of the best epoch are put back.
    With ``config.deadline_s``, it stops at that time. The progress bar shows the estimated end.
    """
    if num_rows <= 0:
        raise ValueError(f"{desc}: nothing to train on")
    if config.precision not in ("float32", "bfloat16"):
        raise ValueError(f"{desc}: precision {config.precision!r} is neither 'float32' nor 'bfloat16'")
    modules = list(modules)
    for module in modules:
        module.train()
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(num_rows / config.batch_size)
    num_steps = max(1, math.ceil(config.num_epochs * steps_per_epoch))
    num_warmup = int(config.warmup_fraction * num_steps)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            (step + 1) / (num_warmup + 1)
            if step < num_warmup
            else max(0.0, (num_steps - step) / max(1, num_steps - num_warmup))
        ),
    )
    start_s = time.perf_counter()
    smoothed = math.nan
    first = math.nan
    num_rows_seen = 0
    order = torch.randperm(num_rows, generator=generator)
    position = 0
    stopped: str | None = None
    num_done = 0
    dev_losses: list[float] = []
    best: list[torch.Tensor] | None = None
    with tqdm(total=num_steps, desc=desc, unit="step", disable=not show_progress, leave=True) as bar:
        for step in range(num_steps):
            if position >= num_rows:
                if dev_loss is not None:
                    loss_now = _evaluate(modules, dev_loss)
                    if dev_losses and loss_now > min(dev_losses):
                        dev_losses.append(loss_now)
                        stopped = "dev loss rose"
                        break
                    dev_losses.append(loss_now)
                    best = [p.detach().clone() for p in params]
                order = torch.randperm(num_rows, generator=generator)
                position = 0
            if config.deadline_s is not None and time.time() >= config.deadline_s:
                stopped = "time budget"
                break
            rows = order[position : position + config.batch_size]
            position += config.batch_size
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bfloat16"):
                loss = batch_loss(rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            num_rows_seen += len(rows)
            num_done = step + 1
            value = float(loss.detach())
            smoothed = value if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * value
            if step == 0:
                first = value
            bar.update(1)
            elapsed = time.perf_counter() - start_s
            end_s = time.time() + elapsed / (step + 1) * (num_steps - step - 1)
            if config.deadline_s is not None:
                end_s = min(end_s, config.deadline_s)
            bar.set_postfix(
                loss=f"{smoothed:.4f}", ends=time.strftime("%H:%M:%S", time.localtime(end_s)), refresh=False
            )
    if stopped is None and dev_loss is not None and dev_losses:  # else one epoch: nothing to compare
        dev_losses.append(_evaluate(modules, dev_loss))
        if len(dev_losses) > 1 and dev_losses[-1] > min(dev_losses[:-1]):
            stopped = "dev loss rose after the last epoch"
    if stopped is not None and stopped.startswith("dev loss rose") and best is not None:
        with torch.no_grad():
            for p, saved in zip(params, best, strict=True):
                p.copy_(saved)
    for module in modules:
        module.eval()
    return LoopStats(
        num_done, num_rows_seen, time.perf_counter() - start_s, first, smoothed, stopped, tuple(dev_losses)
    )


def _evaluate(modules: list[nn.Module], dev_loss: Callable[[], float]) -> float:
    for module in modules:
        module.eval()
    with torch.no_grad():
        value = dev_loss()
    for module in modules:
        module.train()
    return value
