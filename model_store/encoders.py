"""Layer-by-layer access to Hugging Face encoders.

An early-exit server must call the embeddings, then one transformer layer at a time, on any subset of
rows. Each architecture family exposes its layers a little differently (MPNet needs a relative position
bias passed to every layer; BERT-style layers return a tensor, MPNet layers a tuple). An adapter hides
that, so the rest of the code sees one signature: ``run_layer(index, hidden, attention_mask) -> hidden``.

The transformers version is pinned in ``pyproject.toml`` because these call signatures change between
releases; ``tests/model_store/test_parity.py`` proves layer-by-layer == the library's own forward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

from model_store.errors import UnsupportedArchitectureError

# model_type values (config.json) whose layers share BERT's `layer(hidden, mask) -> hidden` signature.
BERT_STYLE_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra"})
MPNET_MODEL_TYPES = frozenset({"mpnet"})
DISTILBERT_MODEL_TYPES = frozenset({"distilbert"})
ALBERT_MODEL_TYPES = frozenset({"albert"})
DEBERTA_V2_MODEL_TYPES = frozenset({"deberta-v2"})  # DeBERTa-v2 and -v3 (v3 checkpoints say deberta-v2)
SUPPORTED_MODEL_TYPES = (
    BERT_STYLE_MODEL_TYPES
    | MPNET_MODEL_TYPES
    | DISTILBERT_MODEL_TYPES
    | ALBERT_MODEL_TYPES
    | DEBERTA_V2_MODEL_TYPES
)


class EncoderAdapter(ABC):
    """Uniform per-layer access to one Hugging Face encoder (``BertModel``, ``MPNetModel``, ...)."""

    # False: every layer needs a mask, also when no row has padding (DeBERTa's attention always masks).
    mask_optional = True

    def __init__(self, encoder: PreTrainedModel) -> None:
        self.encoder = encoder
        # Submodule access below is architecture-specific; typed loosely on purpose.
        self._modules_any: Any = encoder
        # The layer modules, looked up once: ``layers`` walks two submodule attributes and a ModuleList
        # index (a few us per layer step on a CPU); nothing replaces a layer module after loading
        # (int8 quantization swaps the Linear modules inside them, in place).
        self._layer_list: tuple[nn.Module, ...] = tuple(self.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    @abstractmethod
    def layers(self) -> nn.ModuleList: ...

    @property
    def takes_token_types(self) -> bool:
        """Whether the encoder embeds token types (segment A/B of a pair): BERT, ALBERT, ELECTRA, ...;
        not RoBERTa-style (one type), DistilBERT, MPNet or DeBERTa-v3."""
        return int(getattr(self.encoder.config, "type_vocab_size", 0) or 0) >= 2

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings for a padded batch: ``(rows, seq) -> (rows, seq, hidden)``."""
        del attention_mask  # positions come from input_ids (RoBERTa/MPNet skip pads themselves)
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        embeddings: torch.Tensor = self._modules_any.embeddings(input_ids=input_ids, **kwargs)
        return embeddings

    def build_attention_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The one mask builder used everywhere: the library's own, for the configured attention kernel."""
        mask: Any = create_bidirectional_mask(
            config=self.encoder.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        return mask  # a tensor or None for the eager/sdpa kernels we configure (never a flex BlockMask)

    def layer_mask(
        self, attention_mask: torch.Tensor, dtype: torch.dtype, padded: bool = True
    ) -> torch.Tensor | None:
        """The per-layer mask for a 2-D ``(rows, seq)`` mask, built with tensor ops only (no host sync).

        ``padded=False`` (the caller knows from its host-side row lengths that no row has padding) gives
        None, as the library does for an all-ones mask, without the ``mask.all()`` it evaluates on the
        device to find that out (a hidden device sync on a GPU, once per layer step). Otherwise the mask
        is ``(rows, 1, 1, seq)``, broadcast over heads and queries: boolean (True = attend) for the sdpa
        and flash kernels, additive in ``dtype`` for eager attention, equal to what
        ``create_bidirectional_mask`` builds (``tests/model_store/test_parity.py``).
        """
        if not padded:
            return None
        keep = attention_mask[:, None, None, :].to(torch.bool)
        if self.encoder.config._attn_implementation == "eager":
            zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
            return torch.where(keep, zero, torch.finfo(dtype).min)
        return keep

    @abstractmethod
    def run_layer(self, index: int, hidden: torch.Tensor, layer_mask: torch.Tensor | None) -> torch.Tensor:
        """Run layer ``index`` (0-based position in the layer list) on ``hidden``."""


class BertStyleAdapter(EncoderAdapter):
    """BERT, MiniLM, RoBERTa and relatives: ``encoder.encoder.layer[i](hidden, mask) -> hidden``."""

    @property
    def layers(self) -> nn.ModuleList:
        layers: nn.ModuleList = self._modules_any.encoder.layer
        return layers

    def run_layer(self, index: int, hidden: torch.Tensor, layer_mask: torch.Tensor | None) -> torch.Tensor:
        out = self._layer_list[index](hidden, layer_mask)
        return out[0] if isinstance(out, tuple) else out


class MPNetAdapter(EncoderAdapter):
    """MPNet: every layer also takes the relative position bias that ``MPNetEncoder`` computes once."""

    @property
    def layers(self) -> nn.ModuleList:
        layers: nn.ModuleList = self._modules_any.encoder.layer
        return layers

    def run_layer(self, index: int, hidden: torch.Tensor, layer_mask: torch.Tensor | None) -> torch.Tensor:
        # The bias depends only on (seq, seq) positions, so it is recomputed for whatever rows remain.
        position_bias = self._modules_any.encoder.compute_position_bias(hidden)
        out = self._layer_list[index](hidden, layer_mask, position_bias)
        return out[0] if isinstance(out, tuple) else out


class DistilBertAdapter(BertStyleAdapter):
    """DistilBERT: ``transformer.layer[i](hidden, mask) -> hidden``; no token types."""

    @property
    def layers(self) -> nn.ModuleList:
        layers: nn.ModuleList = self._modules_any.transformer.layer
        return layers


class AlbertAdapter(EncoderAdapter):
    """ALBERT (PABEE's backbone): ``num_hidden_layers`` steps share ``num_hidden_groups`` layer groups;
    the embeddings (``embedding_size`` wide) are projected to the hidden size before the first layer."""

    @property
    def layers(self) -> nn.ModuleList:
        groups: nn.ModuleList = self._modules_any.encoder.albert_layer_groups
        return groups

    @property
    def num_layers(self) -> int:
        return int(self.encoder.config.num_hidden_layers)

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeddings = super().embed(input_ids, attention_mask, token_type_ids)
        projected: torch.Tensor = self._modules_any.encoder.embedding_hidden_mapping_in(embeddings)
        return projected

    def run_layer(self, index: int, hidden: torch.Tensor, layer_mask: torch.Tensor | None) -> torch.Tensor:
        config = self.encoder.config
        group = int(index / (config.num_hidden_layers / config.num_hidden_groups))  # as AlbertTransformer
        out = self._layer_list[group](hidden, layer_mask)
        return out[0] if isinstance(out, tuple) else out


class DebertaV2Adapter(EncoderAdapter):
    """DeBERTa-v2/v3: disentangled attention takes the relative positions and the (normalised) relative
    embeddings at every layer; its embeddings zero the padding. Its attention always applies a mask, so
    ``layer_mask`` is never None; the ``(rows, 1, 1, seq)`` boolean mask masks the keys as the library's
    ``(rows, 1, seq, seq)`` one does (they differ only on padding queries, which nothing reads)."""

    mask_optional = False

    def __init__(self, encoder: PreTrainedModel) -> None:
        super().__init__(encoder)
        if getattr(encoder.config, "conv_kernel_size", 0) > 0:
            raise UnsupportedArchitectureError(
                "DeBERTa-v2 with conv_kernel_size > 0 (a convolution after layer 1) is not supported"
            )

    @property
    def layers(self) -> nn.ModuleList:
        layers: nn.ModuleList = self._modules_any.encoder.layer
        return layers

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        embeddings: torch.Tensor = self._modules_any.embeddings(
            input_ids=input_ids, mask=attention_mask, **kwargs
        )
        return embeddings

    def build_attention_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        return self.layer_mask(attention_mask, hidden.dtype)

    def layer_mask(
        self, attention_mask: torch.Tensor, dtype: torch.dtype, padded: bool = True
    ) -> torch.Tensor | None:
        del dtype, padded
        return attention_mask[:, None, None, :].to(torch.bool)

    def run_layer(self, index: int, hidden: torch.Tensor, layer_mask: torch.Tensor | None) -> torch.Tensor:
        encoder = self._modules_any.encoder
        out = self._layer_list[index](
            hidden,
            layer_mask,
            relative_pos=encoder.get_rel_pos(hidden),
            rel_embeddings=encoder.get_rel_embedding(),
        )
        return out[0] if isinstance(out, tuple) else out


def adapter_for(encoder: PreTrainedModel) -> EncoderAdapter:
    """Pick the adapter for ``encoder`` by its ``config.model_type``; unknown types are refused."""
    model_type = encoder.config.model_type
    if model_type in BERT_STYLE_MODEL_TYPES:
        return BertStyleAdapter(encoder)
    if model_type in MPNET_MODEL_TYPES:
        return MPNetAdapter(encoder)
    if model_type in DISTILBERT_MODEL_TYPES:
        return DistilBertAdapter(encoder)
    if model_type in ALBERT_MODEL_TYPES:
        return AlbertAdapter(encoder)
    if model_type in DEBERTA_V2_MODEL_TYPES:
        return DebertaV2Adapter(encoder)
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported; supported: {sorted(SUPPORTED_MODEL_TYPES)}"
    )
