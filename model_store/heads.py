"""A fine-tuned checkpoint's own classification head, as the final exit of an early-exit model.

``python -m model_store adopt`` keeps the head of a Hugging Face ``*ForSequenceClassification``
checkpoint unchanged, so that at full depth exitserve returns the checkpoint's own probabilities. Each
family pools and projects a little differently; ``ClassifierHead`` holds the checkpoint's own modules
(under their own names) and replays that family's forward after the last layer:

* ``bert``: the pooler (dense + tanh on the first token), then ``classifier``;
* ``albert``: ``pooler`` + ``pooler_activation`` on the first token, then ``classifier``;
* ``deberta-v2``: ``ContextPooler``, then ``classifier``;
* ``distilbert``: ``pre_classifier`` + ReLU on the first token, then ``classifier``;
* ``roberta``, ``xlm-roberta``, ``camembert``, ``electra``, ``mpnet``: the family's classification head
  (``classifier``), which takes the whole sequence and reads its first token.

Dropout is the checkpoint's and is inactive in eval mode. A saved version rebuilds the head from the
encoder config (``head_for_config``) and loads the weights into it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

from model_store.errors import UnsupportedArchitectureError

SEQUENCE_HEAD_TYPES = frozenset({"roberta", "xlm-roberta", "camembert", "electra", "mpnet"})
HEAD_TYPES = SEQUENCE_HEAD_TYPES | {"bert", "albert", "deberta-v2", "distilbert"}


class ClassifierHead(nn.Module):
    """``(hidden (rows, seq, h), mask) -> logits``, as the checkpoint computes them after its last layer."""

    def __init__(self, model_type: str, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        if model_type not in HEAD_TYPES:
            raise UnsupportedArchitectureError(f"no classification head adapter for {model_type!r}")
        self.model_type = model_type
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        del attention_mask  # every family reads the first token
        m: Any = self
        t = self.model_type
        if t == "bert":
            logits = m.classifier(m.dropout(m.pooler(hidden)))
        elif t == "albert":
            logits = m.classifier(m.dropout(m.pooler_activation(m.pooler(hidden[:, 0]))))
        elif t == "deberta-v2":
            logits = m.classifier(m.dropout(m.pooler(hidden)))
        elif t == "distilbert":
            logits = m.classifier(m.dropout(torch.relu(m.pre_classifier(hidden[:, 0]))))
        else:
            logits = m.classifier(hidden)
        out: torch.Tensor = logits
        return out


def split_classifier(classifier: PreTrainedModel) -> tuple[PreTrainedModel, ClassifierHead]:
    """A ``*ForSequenceClassification`` model as (encoder without pooler, its head). Shares modules."""
    model_type = classifier.config.model_type
    if model_type not in HEAD_TYPES:
        raise UnsupportedArchitectureError(
            f"adopting {model_type!r} classifiers is not supported; supported: {sorted(HEAD_TYPES)}"
        )
    c: Any = classifier
    encoder: Any = classifier.base_model
    if model_type == "bert":
        modules = {"pooler": encoder.pooler, "dropout": c.dropout, "classifier": c.classifier}
        encoder.pooler = None
    elif model_type == "albert":
        modules = {
            "pooler": encoder.pooler,
            "pooler_activation": encoder.pooler_activation,
            "dropout": c.dropout,
            "classifier": c.classifier,
        }
        encoder.pooler = None
    elif model_type == "deberta-v2":
        modules = {"pooler": c.pooler, "dropout": c.dropout, "classifier": c.classifier}
    elif model_type == "distilbert":
        modules = {"pre_classifier": c.pre_classifier, "dropout": c.dropout, "classifier": c.classifier}
    else:
        modules = {"classifier": c.classifier}
    return encoder, ClassifierHead(model_type, modules)


def head_for_config(config: PretrainedConfig, num_labels: int) -> ClassifierHead:
    """A randomly initialised head of ``config``'s family (its weights are loaded afterwards)."""
    config = copy.deepcopy(config)
    if config.num_labels != num_labels:
        config.num_labels = num_labels
    _, head = split_classifier(AutoModelForSequenceClassification.from_config(config))
    return head
