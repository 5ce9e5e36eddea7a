"""Tiny randomly initialised encoders built in the test, and the real MiniLM when installed."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AlbertConfig,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    MPNetConfig,
    PretrainedConfig,
    RobertaConfig,
)

from model_store.early_exit import EarlyExitClassifier

VOCAB = 120
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64
)


def tiny_config(kind: str) -> PretrainedConfig:
    if kind == "bert":
        return BertConfig(**TINY)
    if kind == "roberta":
        return RobertaConfig(**TINY, pad_token_id=1, max_position_embeddings=80)
    if kind == "mpnet":
        return MPNetConfig(**TINY)
    if kind == "distilbert":
        return DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=4, n_heads=4, hidden_dim=64)
    if kind == "albert":  # 4 layers sharing 2 groups: layers 1-2 use group 0, layers 3-4 group 1
        return AlbertConfig(**TINY, embedding_size=16, num_hidden_groups=2, inner_group_num=1)
    if kind == "deberta-v2":  # DeBERTa-v3's settings: relative buckets, layer-normed rel. embeddings
        return DebertaV2Config(
            **TINY,
            relative_attention=True,
            position_buckets=16,
            max_relative_positions=32,
            pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm",
            position_biased_input=False,
            type_vocab_size=0,
        )
    raise ValueError(kind)


def tiny_model(kind: str, num_labels: int = 3, seed: int = 0) -> EarlyExitClassifier:
    torch.manual_seed(seed)
    return EarlyExitClassifier.from_config(tiny_config(kind), num_labels, ramp_hidden=16).eval()


def padded_batch(lengths: list[int], pad_id: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids, right-padded to the longest length, with the matching attention mask."""
    gen = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.randint(5, VOCAB, (len(lengths), longest), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    return ids, mask


KINDS = ["bert", "roberta", "mpnet", "distilbert", "albert", "deberta-v2"]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)
