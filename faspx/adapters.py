"""One adapter per architecture family: where the decoder layers and the linked pairs are.

A linked pair is a set of producer matrices whose rows feed one consumer matrix's columns; removing
a producer row together with the consumer columns it feeds is exact (design.md). Nothing outside
this module knows about module names or architectures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from faspx.errors import UsageError


def attention_shape(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a decoder config; kv heads < heads with grouped-query
    attention, and head dim is the config's own where it has one (it need not be hidden / heads).

        >>> from transformers import LlamaConfig
        >>> attention_shape(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2))
        (4, 2, 16)
    """
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


@dataclass(frozen=True, eq=False)
class Pair:
    """A linked pair inside one decoder layer.

    ``col_unit[c]`` is the producer row (unit) that consumer column ``c`` reads; it is the identity
    except with grouped-query attention, where one v row feeds the o columns of every query head in
    its group. ``physical`` pairs are cut out of the matrices (the stock config has a field for their
    width); the others are zeroed at full width so that stock loaders still read them.
    """

    name: str
    producers: tuple[str, ...]
    consumer: str
    col_unit: torch.Tensor
    physical: bool


@dataclass(frozen=True)
class Adapter:
    """Where a family keeps its layers, its pairs and the config field of the FFN width."""

    family: str
    model_types: tuple[str, ...]
    layers_path: str
    ffn_producers: tuple[str, ...]
    ffn_consumer: str
    v_proj: str
    o_proj: str
    ffn_width_key: str
    # Stock config fields that give a pair's consumer a bias, and every module each field governs:
    # bias-aware restoration may switch one on (the rest of its modules then get zero biases).
    bias_fields: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    # Model types whose layers can take different FFN widths in the nemotron-nas (DeciLM) form that
    # vLLM serves: its layer is LLaMA's (no sliding window, no q/k/v-only bias).
    per_layer_types: tuple[str, ...] = ()
    # The module whose input is the residual stream that the FFN consumer's output is added to as the
    # layer's last step (the layer's output is that input plus the consumer's output), and the config
    # field, if any, that must be true for nothing to follow (OPT-350m norms after the addition).
    ffn_residual: str = ""
    ffn_residual_if: str = ""
    # Whole-attention removal (2SSP's depth stage): the attention submodule and the norm that only it
    # reads (both go), and the modules after the last layer that make the logits (the depth search
    # scores perplexity from the stream). Empty: the family's layers cannot be served without attention.
    attn_module: str = ""
    attn_norm: str = ""
    head: tuple[str, ...] = ()

    def ffn_residual_input(self, config) -> str | None:
        """The module whose input the FFN consumer's output is added to, last in the layer; None if a
        norm follows the addition in this config (the pruning then reruns the whole layer)."""
        if not self.ffn_residual or (self.ffn_residual_if and not getattr(config, self.ffn_residual_if, True)):
            return None
        return self.ffn_residual

    def bias_field(self, config, pair: str) -> tuple[str, tuple[str, ...]] | None:
        """(field, modules) that would give ``pair``'s consumer a bias in this config, if it has one."""
        return next(((f, mods) for p, f, mods in self.bias_fields if p == pair and hasattr(config, f)), None)

    def ffn_widths(self, model: nn.Module) -> list[int]:
        """The FFN width of every decoder layer, read from the modules (they may differ after
        ``--ffn-widths per-layer``)."""
        return [layer.get_submodule(self.ffn_consumer).in_features for layer in self.layers(model)]

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of ``model``, in order."""
        return model.get_submodule(self.layers_path)

    def pairs(self, config) -> list[Pair]:
        """The attention pair (V rows / O columns) and the FFN pair, in the order FASP prunes them."""
        heads, kv_heads, head_dim = attention_shape(config)
        ffn_width = getattr(config, self.ffn_width_key)
        # o column (h, d) reads v row (h // group, d).
        o_head = torch.arange(heads).repeat_interleave(head_dim) // (heads // kv_heads)
        o_dim = torch.arange(head_dim).repeat(heads)
        return [
            Pair("attn", (self.v_proj,), self.o_proj, o_head * head_dim + o_dim, physical=False),
            Pair("ffn", self.ffn_producers, self.ffn_consumer, torch.arange(ffn_width), physical=True),
        ]


OPT = Adapter(
    family="OPT",
    model_types=("opt",),
    layers_path="model.decoder.layers",
    ffn_producers=("fc1",),
    ffn_consumer="fc2",
    v_proj="self_attn.v_proj",
    o_proj="self_attn.out_proj",
    ffn_width_key="ffn_dim",
    ffn_residual="final_layer_norm",
    ffn_residual_if="do_layer_norm_before",
)

LLAMA = Adapter(
    family="LLaMA",
    model_types=("llama", "mistral", "qwen2"),
    layers_path="model.layers",
    ffn_producers=("mlp.gate_proj", "mlp.up_proj"),
    ffn_consumer="mlp.down_proj",
    v_proj="self_attn.v_proj",
    o_proj="self_attn.o_proj",
    ffn_width_key="intermediate_size",
    # LlamaConfig has these; Mistral's and Qwen2's configs do not (hasattr decides).
    bias_fields=(
        ("ffn", "mlp_bias", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
        ("attn", "attention_bias", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")),
    ),
    per_layer_types=("llama",),
    ffn_residual="post_attention_layernorm",
    attn_module="self_attn",
    attn_norm="input_layernorm",
    head=("model.norm", "lm_head"),
)

ADAPTERS = (OPT, LLAMA)
SUPPORTED = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for(config) -> Adapter:
    """The adapter of a transformers config, or a UsageError that lists the supported types.

    Example:
        >>> from transformers import OPTConfig
        >>> adapter_for(OPTConfig()).family
        'OPT'
    """
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UsageError(
        f"architecture {model_type!r} is not supported; supported model types: {', '.join(SUPPORTED)}"
    )
