"""transformers model of a faspx nemotron-nas checkpoint: LLaMA with one FFN width per layer.

Written by faspx (``--ffn-widths per-layer``); load with ``trust_remote_code=True``. Only the form
faspx writes is supported: every layer has its attention (GQA as in the config) and an FFN.
"""

import copy

from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from .configuration_decilm import DeciLMConfig


def ffn_width(ffn_mult, hidden_size):
    """The width vLLM's nemotron_nas model derives from ffn_mult: int(2/3 ffn_mult hidden) up to a multiple of 256."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return -(-width // 256) * 256


class DeciLMForCausalLM(LlamaForCausalLM):
    config_class = DeciLMConfig

    def __init__(self, config):
        super().__init__(config)
        kv_heads = config.num_key_value_heads or config.num_attention_heads
        if len(config.block_configs) != config.num_hidden_layers:
            raise ValueError(f"{len(config.block_configs)} block_configs for {config.num_hidden_layers} layers")
        for layer, block in zip(self.model.layers, config.block_configs, strict=True):
            attention, ffn = block.attention, block.ffn
            if attention.no_op or attention.replace_with_linear or ffn.no_op or ffn.replace_with_linear:
                raise ValueError("this model file supports only full attention and FFN blocks (faspx's form)")
            if attention.n_heads_in_group * kv_heads != config.num_attention_heads:
                raise ValueError("n_heads_in_group must match num_attention_heads / num_key_value_heads")
            layer_config = copy.copy(config)
            layer_config.intermediate_size = ffn_width(ffn.ffn_mult, config.hidden_size)
            layer.mlp = LlamaMLP(layer_config)
        self.post_init()
