"""int8: which quantized engine packs the weights, and that the choice changes kernels, not answers."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from model_store.quantize import INT8_DOT_FLAGS, cpu_flags, int8_engine, is_quantized, quantize_encoder
from tests.model_store.conftest import padded_batch, tiny_model


def test_cpu_flags_are_read_from_the_first_cpu(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_vnni"}
    assert cpu_flags(tmp_path / "absent") == frozenset()
    (tmp_path / "noflags").write_text("processor\t: 0\n")
    assert cpu_flags(tmp_path / "noflags") == frozenset()


@pytest.mark.skipif("onednn" not in torch.backends.quantized.supported_engines, reason="no oneDNN")
def test_onednn_is_chosen_only_where_the_cpu_has_int8_dot_products() -> None:
    for flag in INT8_DOT_FLAGS:
        assert int8_engine(frozenset({"avx2", flag})) == "onednn"
    assert int8_engine(frozenset({"avx2", "fma"})) == torch.backends.quantized.engine
    assert int8_engine(frozenset()) == torch.backends.quantized.engine


def test_an_unknown_engine_is_refused_and_the_global_engine_is_left_alone() -> None:
    before = torch.backends.quantized.engine
    with pytest.raises(ValueError, match="not in this torch"):
        quantize_encoder(tiny_model("bert"), "no-such-engine")
    quantize_encoder(tiny_model("bert"))
    assert torch.backends.quantized.engine == before


def test_every_engine_gives_the_same_logits() -> None:
    """Calibration measured with one engine's kernels stays true when a server packs for another."""
    engines = [e for e in ("fbgemm", "onednn", "x86") if e in torch.backends.quantized.supported_engines]
    if len(engines) < 2:
        pytest.skip("fewer than two x86 quantized engines in this torch")
    model = tiny_model("bert")
    ids, mask = padded_batch([12, 7, 3, 12], pad_id=0)
    logits = {}
    for engine in engines:
        quantized = quantize_encoder(copy.deepcopy(model), engine)
        assert is_quantized(quantized)
        with torch.inference_mode():
            hidden = quantized.embed(ids, mask)
            for layer in range(1, quantized.num_layers + 1):
                hidden = quantized.run_layer(layer, hidden, mask)
            logits[engine] = quantized.ramp_logits(quantized.num_layers, hidden, mask)
    for engine in engines[1:]:
        torch.testing.assert_close(logits[engine], logits[engines[0]], rtol=0, atol=1e-5)


def test_per_channel_scales_reconstruct_every_weight_closer_than_per_tensor() -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    model = tiny_model("bert")
    floats = {
        n: m.weight.detach().clone()
        for n, m in model.encoder.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    errors: dict[str, float] = {}
    for weights in ("per_tensor", "per_channel"):
        quantized = quantize_encoder(copy.deepcopy(model), weights=weights)  # type: ignore[arg-type]
        total = 0.0
        for name, module in quantized.encoder.named_modules():
            if isinstance(module, DynamicLinear):
                w = module.weight()
                wanted = torch.per_channel_affine if weights == "per_channel" else torch.per_tensor_affine
                assert w.qscheme() == wanted
                total += float((w.dequantize() - floats[name]).abs().sum())
        errors[weights] = total
    assert errors["per_channel"] < errors["per_tensor"]


@pytest.mark.parametrize("kind", ["bert", "distilbert", "deberta-v2"])
def test_a_layer_in_row_chunks_gives_each_row_its_unchunked_result(kind: str) -> None:
    model = tiny_model(kind)
    ids, mask = padded_batch([7, 3, 9, 9, 2, 5, 8], pad_id=0)  # 7 rows of 9 tokens, padded
    with torch.no_grad():
        hidden = model.embed(ids, mask)
        whole = model.run_layer(1, hidden, mask)
        layer_mask = model.layer_mask(mask, hidden.dtype)
        whole_masked = model.run_layer_masked(2, whole, layer_mask)
        model.chunk_tokens = 20  # 2 rows of 9 tokens per call: 4 calls
        chunked = model.run_layer(1, hidden, mask)
        chunked_masked = model.run_layer_masked(2, whole, layer_mask)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(chunked_masked, whole_masked, atol=1e-6, rtol=1e-5)


def test_int8_runs_a_large_batch_in_chunks_of_its_token_limit() -> None:
    from model_store.quantize import INT8_CHUNK_TOKENS

    model = quantize_encoder(tiny_model("bert"))
    assert model.chunk_tokens == INT8_CHUNK_TOKENS
    model.chunk_tokens = 18  # 2 rows of 9 tokens per call
    ids, mask = padded_batch([7, 3, 9, 9, 2, 5, 8], pad_id=0)
    with torch.no_grad():
        hidden = model.embed(ids, mask)
        chunked = model.run_layer(1, hidden, mask)
        # Each chunk quantizes its own activations: the result is exactly the chunks' own calls.
        parts = [model.adapter.run_layer(0, hidden[i : i + 2], model.adapter.build_attention_mask(
            hidden[i : i + 2], mask[i : i + 2])) for i in range(0, 7, 2)]  # fmt: skip
        model.chunk_tokens = None
        whole = model.run_layer(1, hidden, mask)
    assert torch.equal(chunked, torch.cat(parts))
    assert not torch.equal(chunked, whole)  # one call: one activation scale for all 7 rows
