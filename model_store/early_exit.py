"""The early-exit classifier: a Hugging Face encoder with one off-ramp after every layer.

Layer numbering, once for the whole project: **layers count from 1**. ``exit_layer == k`` means the
answer came from the ramp after the k-th transformer layer (``ramps[k - 1]``); ``num_layers_run`` is the
number of encoder layers computed for that row. The ramp after the last layer is the final classifier
(the FastBERT "teacher").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from model_store.encoders import SUPPORTED_MODEL_TYPES, EncoderAdapter, adapter_for
from model_store.errors import UnsupportedArchitectureError

DEFAULT_RAMP_HIDDEN = 128


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over real (non-pad) tokens: ``(rows, seq, h) -> (rows, h)``."""
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class OffRamp(nn.Module):
    """Off-ramp: masked mean pooling -> Linear(h, r) -> tanh -> Linear(r, labels).

    Why this design rather than DeeBERT's CLS pooler + linear: sentence encoders such as
    all-MiniLM-L6-v2 were trained with mean pooling and their CLS vector carries little; CLS ramps stayed
    at chance on layers 1-3 while mean-pooled linear probes reached ~96 % at every layer. The small
    bottleneck (FastBERT keeps its student heads narrow too) costs ~h*r FLOPs per row, negligible next
    to a transformer layer, and does not depend on the sequence length beyond the pooling sum.
    """

    def __init__(self, hidden_size: int, num_labels: int, ramp_hidden: int = DEFAULT_RAMP_HIDDEN) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, ramp_hidden)
        self.out = nn.Linear(ramp_hidden, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = masked_mean(hidden, attention_mask)
        return self.out(torch.tanh(self.dense(pooled)))


class EarlyExitClassifier(nn.Module):
    """An encoder plus ``num_layers`` off-ramps, with the steps a server needs exposed one by one.

    The model holds weights only: thresholds, speeds and patience travel with each call.
    """

    def __init__(
        self,
        encoder: PreTrainedModel,
        num_labels: int,
        ramp_hidden: int = DEFAULT_RAMP_HIDDEN,
        final_head: nn.Module | None = None,
    ):
        """``final_head``: the exit after the last layer, when it is not an ``OffRamp`` (an adopted
        checkpoint's own classification head, ``model_store.heads``)."""
        super().__init__()
        self.encoder = encoder
        self.adapter: EncoderAdapter = adapter_for(encoder)
        self.num_labels = num_labels
        self.ramp_hidden = ramp_hidden
        hidden_size = encoder.config.hidden_size
        num_ramps = self.adapter.num_layers - (final_head is not None)
        ramps: list[nn.Module] = [OffRamp(hidden_size, num_labels, ramp_hidden) for _ in range(num_ramps)]
        if final_head is not None:
            ramps.append(final_head)
        self.ramps = nn.ModuleList(ramps)
        # Looked up at every layer step: plain attributes, not a ModuleList index (``ramp_logits``) nor the
        # adapter's layer count through the encoder's submodules (a few us each on a CPU).
        self._ramp_list: tuple[nn.Module, ...] = tuple(ramps)
        self._num_layers = self.adapter.num_layers
        # Set for a model that takes text pairs (the manifest's pair_separator_id): see ``embed``.
        self.pair_separator_id: int | None = None
        # Rows x tokens per encoder call, or None (one call): a larger batch's layer runs on chunks of
        # rows holding at most this many tokens (``_layer``). Set for int8 (``quantize.quantize_encoder``).
        self.chunk_tokens: int | None = None

    @property
    def has_checkpoint_head(self) -> bool:
        """Whether the final exit is an adopted checkpoint's own head (not an ``OffRamp``)."""
        return not isinstance(self.ramps[-1], OffRamp)

    # --- construction -------------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: PretrainedConfig,
        num_labels: int,
        ramp_hidden: int = DEFAULT_RAMP_HIDDEN,
        checkpoint_head: bool = False,
    ) -> EarlyExitClassifier:
        """Randomly initialised encoder of ``config`` (tests, or before loading a state dict); with
        ``checkpoint_head``, the final exit is the family's classification head (``model_store.heads``)."""
        encoder = AutoModel.from_config(config, **_no_pooler(config))
        head = None
        if checkpoint_head:
            from model_store.heads import head_for_config

            head = head_for_config(config, num_labels)
        return cls(encoder, num_labels, ramp_hidden, final_head=head)

    @classmethod
    def from_sequence_classifier(
        cls, classifier: PreTrainedModel, ramp_hidden: int = DEFAULT_RAMP_HIDDEN
    ) -> EarlyExitClassifier:
        """A fine-tuned ``*ForSequenceClassification``: its encoder, new ramps after layers 1..L-1, and its
        own head, unchanged, after the last layer (shares the classifier's modules)."""
        from model_store.heads import split_classifier

        encoder, head = split_classifier(classifier)
        return cls(encoder, len(classifier.config.id2label or {}), ramp_hidden, final_head=head)

    @classmethod
    def from_pretrained_encoder(
        cls, path_or_name: str, num_labels: int, ramp_hidden: int = DEFAULT_RAMP_HIDDEN
    ) -> EarlyExitClassifier:
        """Pretrained encoder from a local directory (or a hub name when a hub is reachable)."""
        config = AutoConfig.from_pretrained(path_or_name)
        adapter_for_config_check(config)
        encoder = AutoModel.from_pretrained(path_or_name, **_no_pooler(config))
        return cls(encoder, num_labels, ramp_hidden)

    # --- the steps a server needs -------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self._num_layers

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embeddings of a padded batch (rows, seq) -> (rows, seq, hidden). A pair model on an encoder with
        token types gives the tokens after the first separator type 1 (segment B), as the tokenizer's
        ``token_type_ids`` do for a pair; derived on the device from the ids, so no row carries them."""
        token_types = None
        if self.pair_separator_id is not None and self.adapter.takes_token_types:
            token_types = pair_token_types(input_ids, self.pair_separator_id)
        return self.adapter.embed(input_ids, attention_mask, token_types)

    def run_layer(self, layer: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run encoder layer ``layer`` (1-based) on any rows: hidden and 2-D mask hold just those rows."""
        layer_mask = self.adapter.build_attention_mask(hidden, attention_mask)
        return self._layer(layer, hidden, layer_mask)

    def layer_mask(
        self, attention_mask: torch.Tensor, dtype: torch.dtype, padded: bool = True
    ) -> torch.Tensor | None:
        """The mask every layer of a batch takes, built once for the batch (see ``EncoderAdapter``)."""
        return self.adapter.layer_mask(attention_mask, dtype, padded)

    def run_layer_masked(
        self, layer: int, hidden: torch.Tensor, layer_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``run_layer`` with the batch's prebuilt ``layer_mask`` (the serving path: no mask per step)."""
        return self._layer(layer, hidden, layer_mask)

    def _layer(self, layer: int, hidden: torch.Tensor, layer_mask: torch.Tensor | None) -> torch.Tensor:
        """The adapter's layer, on chunks of rows of at most ``chunk_tokens`` tokens where that is set.

        Each row's result is its own (rows do not mix in a layer); for int8 only the per-call activation
        scale changes with the chunk, as it changes with the batch."""
        limit = self.chunk_tokens
        if limit is None:  # float32: one call, nothing else on the per-layer path
            return self.adapter.run_layer(layer - 1, hidden, layer_mask)
        rows, seq = hidden.shape[0], hidden.shape[1]
        if rows < 2 or rows * seq <= limit:
            return self.adapter.run_layer(layer - 1, hidden, layer_mask)
        step = max(1, limit // seq)
        parts = []
        for start in range(0, rows, step):
            part_mask = layer_mask
            if layer_mask is not None and layer_mask.shape[0] == rows:
                part_mask = layer_mask[start : start + step]
            parts.append(self.adapter.run_layer(layer - 1, hidden[start : start + step], part_mask))
        return torch.cat(parts)

    def ramp_logits(
        self,
        layer: int,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        ramp_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Logits of the ramp after layer ``layer`` (1-based): (rows, seq, hidden) -> (rows, labels).

        The ramp runs in its own dtype: with a half-precision encoder the ramps stay float32, so the
        pooled mean and the confidence that decides an exit keep full precision. ``ramp_dtype``: that
        dtype, when the caller knows it (the serving runner keeps every ramp float32), which spares
        looking it up from the ramp's parameters at every step (a few us on a CPU)."""
        ramp = self._ramp_list[layer - 1]
        dtype = ramp_dtype if ramp_dtype is not None else next(iter(ramp.parameters())).dtype
        logits: torch.Tensor = ramp(hidden if hidden.dtype == dtype else hidden.to(dtype), attention_mask)
        return logits

    def all_ramp_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Every ramp's logits for every row, no exits (training and calibration)."""
        hidden = self.embed(input_ids, attention_mask)
        logits = []
        for layer in range(1, self.num_layers + 1):
            hidden = self.run_layer(layer, hidden, attention_mask)
            logits.append(self.ramp_logits(layer, hidden, attention_mask))
        return logits


def pair_token_types(input_ids: torch.Tensor, separator_id: int) -> torch.Tensor:
    """Token type 1 for every token after the first ``separator_id`` of its row, else 0: BERT's
    ``token_type_ids`` for ``[CLS] a [SEP] b [SEP]`` (padding, which nothing reads, gets 1)."""
    sep = (input_ids == separator_id).long()
    return ((torch.cumsum(sep, dim=1) - sep) > 0).long()


def _no_pooler(config: PretrainedConfig) -> dict[str, bool]:
    """``add_pooling_layer=False`` for the encoder classes that have a pooler (the ramps pool)."""
    import inspect

    model_class: Any = AutoModel._model_mapping[type(config)]
    accepts = "add_pooling_layer" in inspect.signature(model_class.__init__).parameters
    return {"add_pooling_layer": False} if accepts else {}


def adapter_for_config_check(config: PretrainedConfig) -> None:
    """Refuse an unsupported architecture before any weights are read."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"architecture {config.model_type!r} is not supported; supported: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
