"""Writing a pair solve back into a decoder layer, and the FFN width into the config.

Physical pairs (the FFN) are cut out of the matrices; the others (V/O) are zeroed at full width, so
that stock loaders, which read one head size, still load the result (design.md, "stock first").
"""

from __future__ import annotations

import torch
from torch import nn

from faspx.adapters import Adapter, Pair
from faspx.errors import FaspxError
from faspx.solve import PairSolution


@torch.no_grad()
def write_pair(layer: nn.Module, pair: Pair, solution: PairSolution) -> None:
    """Put the kept rows/columns of ``solution`` into ``layer``: cut out (physical pairs) or zeroed at full width.

    Example:
        >>> from faspx.adapters import OPT; from transformers import OPTConfig
        >>> from transformers.models.opt.modeling_opt import OPTDecoderLayer
        >>> cfg = OPTConfig(hidden_size=8, ffn_dim=6, num_attention_heads=2)
        >>> layer, ffn = OPTDecoderLayer(cfg), OPT.pairs(cfg)[1]
        >>> keep = torch.tensor([0, 2]); cols = layer.fc2.weight[:, keep].double()
        >>> write_pair(layer, ffn, PairSolution(keep, keep, cols, 0.0)); layer.fc1.out_features
        2
    """
    consumer = layer.get_submodule(pair.consumer)
    master = consumer.weight
    keep = solution.keep.to(master.device)
    keep_cols = solution.keep_cols.to(master.device)
    new_cols = solution.new_cols.to(device=master.device, dtype=master.dtype)
    if pair.physical:
        consumer.weight = nn.Parameter(new_cols.contiguous(), requires_grad=False)
        consumer.in_features = len(keep_cols)
        for name in pair.producers:
            producer = layer.get_submodule(name)
            producer.weight = nn.Parameter(producer.weight.data[keep].contiguous(), requires_grad=False)
            if producer.bias is not None:
                producer.bias = nn.Parameter(producer.bias.data[keep].contiguous(), requires_grad=False)
            producer.out_features = len(keep)
        return
    full = torch.zeros_like(master.data)
    full[:, keep_cols] = new_cols
    master.data.copy_(full)
    for name in pair.producers:
        producer = layer.get_submodule(name)
        drop = torch.ones(producer.out_features, dtype=torch.bool, device=master.device)
        drop[keep] = False
        producer.weight.data[drop] = 0
        if producer.bias is not None:
            producer.bias.data[drop] = 0


def set_ffn_width(model: nn.Module, adapter: Adapter) -> int:
    """Write the pruned FFN width into the config (one width for every layer, as stock models need)."""
    widths = {layer.get_submodule(adapter.ffn_consumer).in_features for layer in adapter.layers(model)}
    if len(widths) != 1:
        raise FaspxError(f"layers ended with different FFN widths {sorted(widths)}; a stock config needs one")
    (width,) = widths
    setattr(model.config, adapter.ffn_width_key, width)
    return width
