"""nemotron-nas (DeciLM) config of a faspx checkpoint: per-layer FFN widths, layers without attention.

Written by faspx (``--ffn-widths per-layer``, ``--recipe 2ssp``). ``block_configs`` has one entry per layer:
``{"attention": {"no_op", "replace_with_linear", "n_heads_in_group"}, "ffn": {"no_op",
"replace_with_linear", "intermediate_size"}}``: the exact FFN width, which vLLM's nemotron_nas model
reads when there is no ``ffn_mult`` (older faspx outputs wrote ``ffn_mult``, a width rounded up to a
multiple of 256). The entries are read as attributes (``block.ffn.intermediate_size``), as vLLM reads them.
"""

from types import SimpleNamespace

from transformers import LlamaConfig


def _attributes(value):
    return SimpleNamespace(**{k: _attributes(v) for k, v in value.items()}) if isinstance(value, dict) else value


def _plain(value):
    return {k: _plain(v) for k, v in vars(value).items()} if isinstance(value, SimpleNamespace) else value


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [_attributes(b) for b in block_configs or []]

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [_plain(b) for b in self.block_configs]
        return out
