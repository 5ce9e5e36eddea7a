"""Host time per layer step: the engine core's own Python and bookkeeping per step, kernels excluded.

An ``EngineCore`` on a tiny model (hidden 32), reporting to the server's own Prometheus metrics, is fed
``batch`` one-row requests at a time, as HTTP delivers them, and timed around ``step()`` + ``flush()``
(schedule, the runner's bookkeeping: building the batch, the exit decision's one transfer and its
unpacking, update, metrics, replies encoded). The model's own
computations (embedding, layer, ramp) are timed separately and subtracted: that is the kernel time a
bigger model or a GPU changes; what is left is what this code costs per step. Two kinds of step:

* ``host_step_us`` (1-layer model): the batch turns over in every step: ``batch`` rows embedded and
  answered (admission itself is outside the timed step; it runs as each request arrives);
* ``carried_step_us`` (3-layer model, layer 2 timed): the rows come from the step before and go on to
  the next, as in most steps of a deep model.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHORT = "Congratulations! You have been selected for a free cruise. Reply today to claim your prize."


class _EncodingSink:
    """Stands in for the core's socket: encodes every message (that cost is the core's), sends nowhere."""

    def send(self, identity: bytes, message: Any) -> None:
        from server.engine.messages import encode

        encode(message)


def _timed(fn: Callable[..., Any], spent: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    return wrapper


def time_kernels(model: Any, spent: list[float]) -> None:
    """Add the time of every model computation ``model`` runs to ``spent[0]``: timed where the encoder
    adapter embeds and runs a layer and where each ramp runs, below every entry point the runner may
    use (``run_layer_masked``, not timed at first, was once counted as host time)."""
    adapter = model.adapter
    for name in ("embed", "run_layer"):
        setattr(adapter, name, _timed(getattr(adapter, name), spent))
    for ramp in model.ramps:
        ramp.forward = _timed(ramp.forward, spent)


def cache_kernels(model: Any) -> None:
    """Replace every model computation ``model`` runs (where ``time_kernels`` times them) by the output
    of its first call with the same input shape: a step then costs its host time and nothing else, with
    no timing of its own to subtract."""
    cache: dict[tuple[Any, ...], Any] = {}

    def cached(key: str, fn: Callable[..., Any], shaped: int) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            at = (key, *args[:shaped], tuple(args[shaped].shape))
            if at not in cache:
                cache[at] = fn(*args)
            return cache[at]

        return wrapper

    adapter = model.adapter
    adapter.embed = cached("embed", adapter.embed, 0)  # (ids, mask, token types): by the ids' shape
    adapter.run_layer = cached("layer", adapter.run_layer, 1)  # (index, hidden, mask): by index, hidden
    for number, ramp in enumerate(model.ramps):
        ramp.forward = cached(f"ramp{number}", ramp.forward, 0)


def host_step_us(
    store: Path,
    model: str,
    batch_sizes: tuple[int, ...] = (1, 16, 64),
    num_steps: int = 300,
    *,
    cached_kernels: bool = False,
) -> dict[str, float]:
    """Median host microseconds per layer step at each batch size, on a 1-layer model: every step takes
    ``batch`` new one-row requests in and answers them all (the whole batch turns over).
    ``cached_kernels``: the model's computations replaced by cached outputs (``cache_kernels``), not timed
    and subtracted."""
    return _step_us(store, model, batch_sizes, num_steps, 1, cached_kernels)


def carried_step_us(
    store: Path,
    model: str,
    batch_sizes: tuple[int, ...] = (1, 16, 64),
    num_steps: int = 300,
    *,
    cached_kernels: bool = False,
) -> dict[str, float]:
    """Median host microseconds of a layer step whose rows are carried from the layer before to the
    layer after (none enters, none exits: most steps of a deep model), on a model of 3 layers or more:
    rows run to full depth and the step of layer 2 is timed."""
    return _step_us(store, model, batch_sizes, num_steps, 2, cached_kernels)


def _step_us(
    store: Path, model: str, batch_sizes: tuple[int, ...], num_steps: int, timed_layer: int, cached: bool
) -> dict[str, float]:
    import gc

    import torch

    try:
        with torch.inference_mode():  # as the core's loop runs; the caller's grad mode is left as it was
            return _measure(store, model, batch_sizes, num_steps, timed_layer, cached)
    finally:
        gc.unfreeze()  # ``_measure`` froze as the server does; this process's objects go back to collection


def _measure(
    store: Path, model: str, batch_sizes: tuple[int, ...], num_steps: int, timed_layer: int, cached: bool
) -> dict[str, float]:
    from model_store.policy import CRITERION_CODES, Criterion
    from model_store.store import ModelStore
    from model_store.tokens import RowTokenizer
    from server.engine.core import EngineCore
    from server.engine.messages import AddRequest, pack_token_ids
    from server.engine.types import EngineConfig
    from server.metrics import ServerMetrics

    loaded = ModelStore(store).load(model)
    freeze_like_the_server()
    num_layers = loaded.manifest.num_layers
    if timed_layer > 1 and num_layers <= timed_layer:
        raise ValueError(f"{model} has {num_layers} layer(s); a carried step needs {timed_layer + 1} or more")
    spent = [0.0]  # stays 0 with cached kernels: nothing to subtract
    if cached:
        cache_kernels(loaded.model)
    else:
        time_kernels(loaded.model, spent)
    ids = RowTokenizer(loaded.tokenizer, loaded.manifest.max_seq_length)([SHORT])[0][0]
    sink = _EncodingSink()
    results: dict[str, float] = {}
    for batch in batch_sizes:
        config = EngineConfig(
            max_batch_size=batch,
            max_wait_ms=0.0,
            max_queue_wait_ms=None,
            calibrate_step_cost=False,
            guard_sample_fraction=0.0,
        )
        # The server's own metrics (one process, as ``--frontends 1``): what the core reports per step
        # is host time the server pays (a do-nothing observer once hid ~100 us of it at 64 rows).
        metrics = ServerMetrics(model)
        metrics.bind_model(num_layers)
        core = EngineCore(loaded, config, metrics)
        core.handle(b"bench", _hello())
        request_id = 0
        samples: list[float] = []
        for round_ in range(num_steps + 20):
            for _ in range(batch):  # threshold 0: no early exit, every row runs every layer
                request_id += 1
                core.handle(
                    b"bench",
                    AddRequest(
                        epoch=core.epoch, request_id=request_id, token_ids=[pack_token_ids(ids)],
                        criterion_code=CRITERION_CODES[Criterion.NORMALIZED_ENTROPY], threshold=0.0,
                        max_layers=num_layers, speed=0.0, speed_is_default=False, deadline_s=None,
                    ),
                )  # fmt: skip
            for layer in range(1, num_layers + 1):
                spent[0] = 0.0
                started = time.perf_counter()
                core.step()
                core.flush(sink)  # type: ignore[arg-type]
                elapsed = time.perf_counter() - started - spent[0]
                if layer == timed_layer and round_ >= 20:  # warm-up rounds are not counted
                    samples.append(elapsed)
            if core.num_live_requests:
                raise RuntimeError(f"{core.num_live_requests} requests unanswered after {num_layers} steps")
        results[str(batch)] = statistics.median(samples) * 1e6
    return results


def freeze_like_the_server() -> None:
    """What the server does once its model is loaded (``server.gc_freeze.freeze_alive``). A benchmark
    process that does not pays collections over the libraries' objects that a served core no longer
    pays (this benchmark at 64 rows, kernels cached, medians of four runs: 273-470 µs a step unfrozen,
    200-322 frozen, three of the four at 200-208)."""
    from server.gc_freeze import freeze_alive

    freeze_alive()


def _hello() -> Any:
    from server.engine.messages import Hello

    return Hello(1)


def floor_step_us(batch: int = 64, num_tokens: int = 24, num_labels: int = 2, num_steps: int = 2000) -> float:
    """Median microseconds of what a turnover step of ``batch`` one-row requests cannot avoid in Python
    and torch on a CPU, and nothing else: take the rows, join their ids into one buffer, the tensor views
    the layer needs, a softmax and an argmax over the ramp's logits, reading both, one reply record per
    row and one msgpack encode. No scheduling, admission, exit decision or metrics: the floor that
    ``host_step_us`` (the engine's step) is compared with in BENCHMARKS.md."""
    import struct
    from array import array
    from collections import deque

    import torch

    from server.engine.messages import TOKEN_ID_TYPECODE, AdmissionView, Finished, Outputs, encode

    ids = array(TOKEN_ID_TYPECODE, range(100, 100 + num_tokens))
    waiting: deque[tuple[int, array[int], float]] = deque()
    logits = torch.randn(batch, num_labels)

    def step() -> None:
        if len(waiting) < batch:
            waiting.extend((i, ids, 0.5) for i in range(batch * 64))
        rows = [waiting.popleft() for _ in range(batch)]
        # The per-row numbers packed as ``Runner._embed`` packs them (``struct``: an ``array`` built from a
        # list converts item by item).
        parts: list[bytes | array[int]] = [struct.pack(f"{batch}f", *[r[2] for r in rows])]
        parts += [r[1] for r in rows]
        parts.append(struct.pack(f"{batch}i", *[num_tokens] * batch))
        packed = torch.frombuffer(bytearray().join(parts), dtype=torch.int32)
        longs = packed[batch:].long()
        longs[: batch * num_tokens].view(batch, num_tokens)
        torch.ones((batch, num_tokens), dtype=torch.long)
        packed[:batch].view(torch.float32)
        probs = torch.softmax(logits, dim=-1)
        labels = probs.argmax(dim=-1).tolist()
        replies = [
            Finished(r[0], [(label, p, 1, False)], 0.001, 0.002)
            for r, label, p in zip(rows, labels, probs.tolist(), strict=True)
        ]
        encode(Outputs(replies, [], AdmissionView()))

    with torch.no_grad():
        for _ in range(200):
            step()
        samples = []
        for _ in range(num_steps):
            started = time.perf_counter()
            step()
            samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6
