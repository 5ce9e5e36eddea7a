"""int8 on CPU: the encoder's Linear layers as dynamically quantized int8 (weights int8, activations
quantized per call); embeddings, LayerNorms, attention and the off-ramps stay float32.

A quantized model is its own model version (``python -m model_store quantize NAME``): its exits shift
when its weights change, so it gets its own calibration table, and its manifest says
``"quantization": "int8_dynamic"``. The version stores the float32 weights it was made from; the int8
weights are derived from them when the version is loaded (per-tensor min/max, deterministic), so the
weights served are exactly the ones its calibration measured.

Which API: torch's eager ``torch.ao.quantization.quantize_dynamic`` (fbgemm/x86 kernels), although it is
deprecated in favour of torchao. On this project's CPU machine (AMD EPYC, AVX2, no VNNI), for a MiniLM
feed-forward block (384 -> 1536 -> 384) at 256 rows on one thread: float32 10.3 ms, ``quantize_dynamic``
7.8 ms, torchao 0.18's eager ``Int8DynamicActivationInt8WeightConfig`` 266 ms (its fast CPU path needs
``torch.compile``, which a layer-by-layer server with shrinking batches would recompile per shape). When
torchao's eager path is fast on CPU, this module is the one place to change.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn

from model_store.early_exit import EarlyExitClassifier

Quantization = Literal["none", "int8_dynamic"]


def quantize_encoder(model: EarlyExitClassifier) -> EarlyExitClassifier:
    """Replace the encoder's ``nn.Linear`` modules with dynamic int8 ones, in place (CPU only)."""
    from torch.ao.quantization import quantize_dynamic

    if next(model.parameters()).device.type != "cpu":
        raise ValueError("int8 quantization runs on CPU only; load the model on cpu")
    with warnings.catch_warnings():
        # The deprecation of torch.ao's eager quantization is known; the module docstring says why it is
        # still the choice.
        warnings.simplefilter("ignore")
        quantize_dynamic(model.encoder, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


def is_quantized(model: EarlyExitClassifier) -> bool:
    """Whether the encoder holds int8 Linear layers."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return any(isinstance(m, DynamicLinear) for m in model.encoder.modules())
