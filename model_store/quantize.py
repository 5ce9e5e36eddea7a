"""int8 on CPU: the encoder's Linear layers as dynamically quantized int8 (weights int8, activations
quantized per call); embeddings, LayerNorms, attention and the off-ramps stay float32.

A quantized model is its own model version (``python -m model_store quantize NAME``): its exits shift
when its weights change, so it gets its own calibration table, and its manifest says
``"quantization": "int8_dynamic"``. The version stores the float32 weights it was made from; the int8
weights are derived from them when the version is loaded (min/max scales per output channel, or per
tensor for versions saved before that; deterministic), so the weights served are the ones its calibration
measured.

Which API: torch's eager ``torch.ao.quantization.quantize_dynamic`` (fbgemm/x86 kernels), although it is
deprecated in favour of torchao. On this project's CPU machine (AMD EPYC, AVX2, no VNNI), for a MiniLM
feed-forward block (384 -> 1536 -> 384) at 256 rows on one thread: float32 10.3 ms, ``quantize_dynamic``
7.8 ms, torchao 0.18's eager ``Int8DynamicActivationInt8WeightConfig`` 266 ms (its fast CPU path needs
``torch.compile``, which a layer-by-layer server with shrinking batches would recompile per shape). When
torchao's eager path is fast on CPU, this module is the one place to change.

Which kernels: the quantized engine that packs the weights decides which kernels run (the packed weights
carry it; the global engine at call time does not matter). On a CPU with int8 dot-product instructions
(AVX512-VNNI or AMX) oneDNN's kernels are the fast ones: a MiniLM feed-forward block on one thread of an
Intel Xeon with AMX ran 1,024 rows in 6.1 ms packed for oneDNN against 12.2 ms for fbgemm and 10.5 ms for
torch's default ``x86`` engine, with the same outputs to the last bit for weights scaled per tensor.
Elsewhere torch's default engine is kept (on the AVX2 AMD EPYC above it is fbgemm's path).
``int8_engine()`` makes the choice.

Which scales: ``python -m model_store quantize`` scales weights per output channel. On the default model
built at commit ``a27ea32`` (float32 full depth 97.13 % on the test split), weights scaled per tensor lost
0.7-1.7 pt at every exit layer (full depth 96.45 %); per channel they lost none at full depth (97.47 %
with oneDNN, 97.64 % with fbgemm), for the same kernel time. Per-channel outputs differ a little between
engines, so a version records the engine it was calibrated with (``Manifest.int8_engine``) and a server
packs for that engine where its torch has it. Versions saved before say nothing and load per tensor.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from model_store.early_exit import EarlyExitClassifier

Quantization = Literal["none", "int8_dynamic"]


# /proc/cpuinfo flags of int8 dot-product instructions that oneDNN's int8 kernels use.
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "amx_int8"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags (empty where ``/proc/cpuinfo`` is absent: not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def int8_engine(flags: frozenset[str] | None = None) -> str:
    """The quantized engine to pack int8 weights for: ``onednn`` on a CPU with VNNI or AMX when torch has
    it, else torch's current engine (its default unless set)."""
    supported = torch.backends.quantized.supported_engines
    if "onednn" in supported and (cpu_flags() if flags is None else flags) & INT8_DOT_FLAGS:
        return "onednn"
    return str(torch.backends.quantized.engine)


Int8Weights = Literal["per_tensor", "per_channel"]

# An int8 layer runs on chunks of rows of at most this many tokens. Each dynamic int8 Linear quantizes
# its input and the feed-forward block's 1,536-wide intermediate (25 MB at 64 rows of 64 tokens) is read
# again for that: in cache-sized chunks the layer is faster. The default model's layer on 64 rows of 64
# tokens, 2 threads of a Zen 4 EPYC: 48 ms in one call, 37 ms in chunks of 16 or 32 rows, 40 ms in
# chunks of 8 (float32: 98 ms in one call, 94-95 ms in chunks, so float32 runs in one call).
INT8_CHUNK_TOKENS = 1024


def quantize_encoder(
    model: EarlyExitClassifier, engine: str | None = None, weights: Int8Weights = "per_tensor"
) -> EarlyExitClassifier:
    """Replace the encoder's ``nn.Linear`` modules with dynamic int8 ones, in place (CPU only), their
    weights scaled per tensor or per output channel and packed for ``engine`` (None: ``int8_engine()``)."""
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    if next(model.parameters()).device.type != "cpu":
        raise ValueError("int8 quantization runs on CPU only; load the model on cpu")
    engine = engine or int8_engine()
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(
            f"quantized engine {engine!r} is not in this torch ({torch.backends.quantized.supported_engines})"
        )
    previous = torch.backends.quantized.engine
    with warnings.catch_warnings():
        # The deprecation of torch.ao's eager quantization is known; the module docstring says why it is
        # still the choice.
        warnings.simplefilter("ignore")
        try:
            torch.backends.quantized.engine = engine
            qconfig = per_channel_dynamic_qconfig if weights == "per_channel" else default_dynamic_qconfig
            quantize_dynamic(model.encoder, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)
        finally:
            torch.backends.quantized.engine = previous
    model.chunk_tokens = INT8_CHUNK_TOKENS
    return model


def is_quantized(model: EarlyExitClassifier) -> bool:
    """Whether the encoder holds int8 Linear layers."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return any(isinstance(m, DynamicLinear) for m in model.encoder.modules())
