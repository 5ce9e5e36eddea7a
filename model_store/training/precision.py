"""Fine-tuning precision: float32, or bf16 autocast where the CPU computes in bf16.

On a CPU with bf16 instructions (AVX512-BF16 or AMX-BF16) a MiniLM-L6 fine-tuning step (16 rows of 64
tokens, 2 threads) under bf16 autocast took 0.43-0.46 s against 0.75-0.87 s in float32 on a 2-core AMD
EPYC (Zen 4), and 0.44-0.46 s against 0.66-0.77 s on a 2-core Xeon with AMX. Without those instructions
torch has no native bf16 kernels for it (not measured here), so ``"auto"`` keeps float32 there.

Only fine-tuning's forward runs in bf16 (weights, gradients' accumulation and AdamW stay float32); the
ramps, the features they train on, calibration and serving are float32, so a version's calibration is
measured with the weights and the precision it is served with.
"""

from __future__ import annotations

from model_store.quantize import cpu_flags

PRECISIONS: tuple[str, ...] = ("auto", "float32", "bfloat16")
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, flags: frozenset[str] | None = None) -> str:
    """``"auto"`` -> ``"bfloat16"`` where the CPU has bf16 instructions, else ``"float32"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bfloat16" if BF16_FLAGS & (cpu_flags() if flags is None else flags) else "float32"
