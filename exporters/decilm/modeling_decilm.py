"""transformers model of a faspx nemotron-nas checkpoint: LLaMA with per-layer FFN widths and attention.

Written by faspx (``--ffn-widths per-layer``, ``--recipe 2ssp``); load with ``trust_remote_code=True``.
Per block: ``attention.no_op`` (the attention submodule and its input norm are gone) or full attention
with the config's GQA; an FFN of width ``ffn.intermediate_size``. Linear replacements and removed FFNs
(which vLLM also reads) are not faspx's form and are refused.
"""

import copy

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from .configuration_decilm import DeciLMConfig


class NoAttention(nn.Module):
    """A removed attention submodule: it adds nothing to the residual stream and has no weights.

    With a cache it appends one value per token (batch x 1 x tokens x 1), so that the cache still
    counts the tokens seen: transformers reads that count from layer 0's entry, which may be this one.
    """

    def __init__(self, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            mark = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(mark, mark, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class DeciLMForCausalLM(LlamaForCausalLM):
    config_class = DeciLMConfig

    def __init__(self, config):
        super().__init__(config)
        kv_heads = config.num_key_value_heads or config.num_attention_heads
        if len(config.block_configs) != config.num_hidden_layers:
            raise ValueError(f"{len(config.block_configs)} block_configs for {config.num_hidden_layers} layers")
        for index, (layer, block) in enumerate(zip(self.model.layers, config.block_configs, strict=True)):
            attention, ffn = block.attention, block.ffn
            if getattr(attention, "replace_with_linear", False) or ffn.no_op or getattr(ffn, "replace_with_linear",
                                                                                        False):
                raise ValueError("this model file supports full or removed attention and an FFN (faspx's form)")
            if attention.no_op:
                layer.self_attn, layer.input_layernorm = NoAttention(index), nn.Identity()
            elif attention.n_heads_in_group * kv_heads != config.num_attention_heads:
                raise ValueError("n_heads_in_group must match num_attention_heads / num_key_value_heads")
            layer_config = copy.copy(config)
            layer_config.intermediate_size = ffn.intermediate_size
            layer.mlp = LlamaMLP(layer_config)
        self.post_init()
