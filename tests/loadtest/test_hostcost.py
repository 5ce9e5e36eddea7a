"""The host-time benchmark subtracts every model computation, whichever entry point the runner uses."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from loadtest.hostcost import carried_step_us, floor_step_us, host_step_us
from loadtest.tiny import make_tiny_store
from model_store.store import ModelStore

pytestmark = pytest.mark.model

SLEEP_S = 0.005


@pytest.mark.serial
def test_kernel_time_is_not_counted_as_host_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tiny_store(tmp_path / "store", max_seq_length=32)
    load = ModelStore.load

    def slow_load(self: ModelStore, name: str, *args: Any, **kwargs: Any) -> Any:
        loaded = load(self, name, *args, **kwargs)
        # Every linear layer of the encoder and the ramps sleeps: a step's kernels take >= 6 x 5 ms
        # (BERT layer: q, k, v, out, intermediate, output), far above any host cost at batch 1.
        for module in loaded.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(lambda *_: time.sleep(SLEEP_S))
        return loaded

    monkeypatch.setattr(ModelStore, "load", slow_load)
    result = host_step_us(tmp_path / "store", "tiny-1layer", batch_sizes=(1,), num_steps=10)
    assert 0.0 < result["1"] < 3 * SLEEP_S * 1e6, result
    # The carried step (layer 2 of 3; every row answered after layer 3, else it raises), likewise.
    make_tiny_store(tmp_path / "store", "tiny-3layer", max_seq_length=32, num_layers=3)
    carried = carried_step_us(tmp_path / "store", "tiny-3layer", batch_sizes=(1,), num_steps=5)
    assert 0.0 < carried["1"] < 3 * SLEEP_S * 1e6, carried
    with pytest.raises(ValueError, match="carried step"):
        carried_step_us(tmp_path / "store", "tiny-1layer", batch_sizes=(1,), num_steps=1)
    assert torch.is_grad_enabled()  # the benchmark leaves the caller's grad mode alone


def test_the_floor_step_encodes_replies_the_front_ends_can_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The floor does the work it stands for: one reply per row of the step, in a message a front end
    decodes (the engine's own message types, so a change of them shows here)."""
    import server.engine.messages as messages

    sent: list[bytes] = []
    encode = messages.encode
    monkeypatch.setattr(messages, "encode", lambda message: sent.append(encode(message)) or sent[-1])
    assert floor_step_us(batch=16, num_steps=3) > 0.0
    decoded = messages.decode_to_front_end(sent[-1])
    assert isinstance(decoded, messages.Outputs) and len(decoded.finished) == 16
    label, probs, exit_layer, _ = decoded.finished[0].rows[0]
    assert exit_layer == 1 and len(probs) == 2 and probs[label] == max(probs)


@pytest.mark.serial
def test_cached_kernels_run_once_per_shape_and_leave_host_time_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``cached_kernels`` every model computation runs once per input shape (then its output is
    reused), so a step's time is its host time: sleeping linears cost nothing after the first step."""
    make_tiny_store(tmp_path / "store", max_seq_length=32)
    load = ModelStore.load
    calls: list[int] = []

    def slow_load(self: ModelStore, name: str, *args: Any, **kwargs: Any) -> Any:
        loaded = load(self, name, *args, **kwargs)
        for module in loaded.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(lambda *_: calls.append(1) or time.sleep(SLEEP_S))
        return loaded

    monkeypatch.setattr(ModelStore, "load", slow_load)
    result = host_step_us(
        tmp_path / "store", "tiny-1layer", batch_sizes=(1, 4), num_steps=10, cached_kernels=True
    )
    assert 0.0 < result["1"] < SLEEP_S * 1e6 and 0.0 < result["4"] < SLEEP_S * 1e6, result
    # One embedding, one layer (q, k, v, out, intermediate, output: 6 linears) and one ramp (2) per
    # batch size: 8 linears each for batch sizes 1 and 4, whatever the 30 + 30 steps.
    assert len(calls) == 2 * 8
