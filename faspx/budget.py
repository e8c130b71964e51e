"""How many channel units each pair loses, so the decoder's linear weights lose the requested fraction.

Sparsity s counts the weights of every nn.Linear inside the decoder layers (embeddings and lm_head
excluded, as in Wanda/SparseGPT). Q and K are never pruned, so the prunable pairs are cut at one
ratio r = s * (all linear weights) / (weights of the pairs that take the budget), the same in every
layer, rounded to whole units. ``auto`` chooses among a few splits of the same budget between the
attention and FFN pairs (``candidates``) by measured output error (faspx.prune.choose_split).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from faspx.adapters import Adapter, Pair
from faspx.errors import UsageError

STRUCTURES = ("fasp", "mlp", "auto", "2ssp")
# 2SSP's balance between its two stages (the paper's choice, its section 4.3).
ALPHA = 1.5
# Candidate attention shares for --structure auto, as multiples of the paper's (equal-ratio) share.
AUTO_SHARES = (0.0, 0.5, 1.0, 1.5, 2.0)


@dataclass(frozen=True)
class Budget:
    """Units to remove per pair (same in every layer) and the weight counts behind them."""

    n_remove: dict[str, int]
    units: dict[str, int]
    unit_weights: dict[str, int]
    layer_weights: int
    n_layers: int
    # structure 2ssp: whole attention submodules removed (which ones is measured), and the linear
    # weights of one of them
    depth: int = 0
    attn_weights: int = 0

    @property
    def removed_weights(self) -> int:
        """Decoder linear weights removed across all layers (nominal: zeroed ones count)."""
        return (self.n_layers * sum(self.n_remove[p] * self.unit_weights[p] for p in self.n_remove)
                + self.depth * self.attn_weights)

    @property
    def removed_fraction(self) -> float:
        """The sparsity actually reached after rounding to whole units."""
        return self.removed_weights / (self.n_layers * self.layer_weights)


def pair_weights(layer: nn.Module, pair: Pair) -> int:
    """Weights of a pair in one layer: its producers' matrices and its consumer's."""
    names = (*pair.producers, pair.consumer)
    return sum(layer.get_submodule(n).weight.numel() for n in names)


def linear_weights(layer: nn.Module) -> int:
    """Weights of every nn.Linear in a decoder layer."""
    return sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))


def max_sparsity(model: nn.Module, adapter: Adapter, structure: str) -> float:
    """The supremum of legal sparsities: the budget pairs' share of the layer's linear weights."""
    layer = adapter.layers(model)[0]
    pairs = _budget_pairs(adapter.pairs(model.config), structure)
    return sum(pair_weights(layer, p) for p in pairs) / linear_weights(layer)


def plan(model: nn.Module, adapter: Adapter, sparsity: float, structure: str = "fasp",
         alpha: float = ALPHA) -> Budget:
    """Units to remove in each pair for ``sparsity``; a UsageError names the legal range.

    Works on a model on the ``meta`` device, so input is checked before any weight is loaded.
    ``auto`` has fasp's legal range and returns fasp's plan: prune() replaces it by the measured best
    of ``candidates``. ``2ssp`` is ``plan_2ssp`` (``alpha``: its balance).

    Example:
        >>> import torch
        >>> from transformers import AutoModelForCausalLM, OPTConfig
        >>> from faspx.adapters import OPT
        >>> cfg = OPTConfig(hidden_size=16, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2)
        >>> with torch.device("meta"):
        ...     m = AutoModelForCausalLM.from_config(cfg)
        >>> plan(m, OPT, 0.25, "mlp").n_remove
        {'attn': 0, 'ffn': 24}
    """
    if structure not in STRUCTURES:
        raise UsageError(f"structure {structure!r} is not one of {', '.join(STRUCTURES)}")
    if structure == "2ssp":
        return plan_2ssp(model, adapter, sparsity, alpha)
    s_max = max_sparsity(model, adapter, structure)
    if not 0.0 <= sparsity < s_max:
        raise UsageError(
            f"sparsity {sparsity} is out of range: it must be in [0, {s_max:.4f}) for "
            f"--structure {structure} on this model (q/k projections are never pruned)"
        )
    layer = adapter.layers(model)[0]
    pairs = adapter.pairs(model.config)
    budget_pairs = _budget_pairs(pairs, structure)
    budget_names = {p.name for p in budget_pairs}
    total = linear_weights(layer)
    ratio = sparsity * total / sum(pair_weights(layer, p) for p in budget_pairs)
    units = {p.name: int(p.col_unit.max()) + 1 for p in pairs}
    n_remove = {
        p.name: min(round(ratio * units[p.name]), units[p.name] - 1) if p.name in budget_names else 0
        for p in pairs
    }
    unit_weights = {p.name: pair_weights(layer, p) // units[p.name] for p in pairs}
    return Budget(n_remove, units, unit_weights, total, len(adapter.layers(model)))


def attention_removals(n_layers: int, sparsity: float, ffn_params: int, attn_params: int,
                       alpha: float = ALPHA) -> int:
    """2SSP's number of attention submodules to remove: round(N * s^((FFN params / attention params) / alpha)).

    Example (SmolLM2-135M: 30 layers, FFN 3x the attention's parameters):
        >>> attention_removals(30, 0.25, 3, 1), attention_removals(30, 0.375, 3, 1), attention_removals(30, 0.5, 3, 1)
        (2, 4, 8)
    """
    return round(n_layers * sparsity ** ((ffn_params / attn_params) / alpha))


def module_params(module: nn.Module) -> int:
    """Parameters of a module (weights, biases, norms)."""
    return sum(p.numel() for p in module.parameters())


def plan_2ssp(model: nn.Module, adapter: Adapter, sparsity: float, alpha: float = ALPHA) -> Budget:
    """2SSP's balance: ``attention_removals`` whole attention submodules, the rest of the budget cut
    uniformly from every FFN, as the paper counts it (the fraction of all decoder-layer parameters,
    norms included; one FFN unit is a row of each producer and a column of the consumer).

    Example:
        >>> import torch
        >>> from transformers import AutoModelForCausalLM, LlamaConfig
        >>> from faspx.adapters import LLAMA
        >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=8, num_attention_heads=4,
        ...                   num_key_value_heads=2)
        >>> with torch.device("meta"):
        ...     m = AutoModelForCausalLM.from_config(cfg)
        >>> b = plan_2ssp(m, LLAMA, 0.5); b.depth, b.n_remove
        (2, {'attn': 0, 'ffn': 112})
    """
    if not adapter.attn_module or model.config.model_type not in adapter.per_layer_types:
        raise UsageError(
            f"structure 2ssp removes whole attention submodules, which only the nemotron-nas (DeciLM) form can "
            f"hold, and that is LLaMA's layer: model type {model.config.model_type!r} cannot take it "
            f"(supported: {', '.join(adapter.per_layer_types) or 'none of ' + adapter.family})")
    if not 0.0 <= sparsity < 1.0:
        raise UsageError(f"sparsity {sparsity} is out of range: it must be in [0, 1) for --structure 2ssp")
    layers = adapter.layers(model)
    layer, n_layers = layers[0], len(layers)
    pairs = adapter.pairs(model.config)
    ffn = next(p for p in pairs if p.name == "ffn")
    attn_params = module_params(layer.get_submodule(adapter.attn_module))
    ffn_params = sum(module_params(layer.get_submodule(n)) for n in (*ffn.producers, ffn.consumer))
    total = module_params(layer) * n_layers
    depth = attention_removals(n_layers, sparsity, ffn_params, attn_params, alpha)
    target = round(sparsity * total)
    if depth * attn_params > target or depth * attn_params + n_layers * ffn_params < target:
        raise UsageError(f"sparsity {sparsity}: 2SSP's balance removes {depth} attention submodules, which the "
                         f"FFNs cannot complete to the target; choose a sparsity below "
                         f"{(n_layers * ffn_params) / total:.3f}")
    width = int(ffn.col_unit.max()) + 1
    ffn_rate = round((target - depth * attn_params) / n_layers) / ffn_params
    n_ffn = width - round(width * (1 - ffn_rate))
    if n_ffn >= width:
        raise UsageError(f"sparsity {sparsity} leaves no FFN channel; choose a lower sparsity")
    units = {p.name: int(p.col_unit.max()) + 1 for p in pairs}
    unit_weights = {p.name: pair_weights(layer, p) // units[p.name] for p in pairs}
    attn_weights = sum(m.weight.numel() for m in layer.get_submodule(adapter.attn_module).modules()
                       if isinstance(m, nn.Linear))
    return Budget({"attn": 0, "ffn": n_ffn}, units, unit_weights, linear_weights(layer), n_layers,
                  depth=depth, attn_weights=attn_weights)


def split(model: nn.Module, adapter: Adapter, sparsity: float, attn_share: float) -> Budget | None:
    """The plan that takes ``attn_share`` of the removed weights from the attention pair and the rest
    from the FFN pair, rounded to whole units; None when the FFN cannot take its part.

    Example:
        >>> import torch
        >>> from transformers import AutoModelForCausalLM, OPTConfig
        >>> from faspx.adapters import OPT
        >>> cfg = OPTConfig(hidden_size=16, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2)
        >>> with torch.device("meta"):
        ...     m = AutoModelForCausalLM.from_config(cfg)
        >>> split(m, OPT, 0.25, 0.0).n_remove
        {'attn': 0, 'ffn': 24}
    """
    base = plan(model, adapter, sparsity, "fasp")
    target = sparsity * base.layer_weights
    attn = min(round(attn_share * target / base.unit_weights["attn"]), base.units["attn"] - 1)
    ffn = round((target - attn * base.unit_weights["attn"]) / base.unit_weights["ffn"])
    if not 0 <= ffn < base.units["ffn"]:
        return None
    return Budget({"attn": attn, "ffn": ffn}, base.units, base.unit_weights, base.layer_weights, base.n_layers)


def candidates(model: nn.Module, adapter: Adapter, sparsity: float) -> list[Budget]:
    """The splits ``--structure auto`` measures: the paper's equal ratio (fasp), all in the FFN (mlp),
    and attention shares of 0.5x, 1.5x and 2x the paper's; feasible ones only, no duplicates."""
    layer = adapter.layers(model)[0]
    attn, ffn = (pair_weights(layer, p) for p in adapter.pairs(model.config))
    equal_share = attn / (attn + ffn)
    found = [plan(model, adapter, sparsity, "fasp")]
    found += [split(model, adapter, sparsity, k * equal_share) for k in AUTO_SHARES if k != 1.0]
    unique: dict[tuple, Budget] = {}
    for budget in found:
        if budget is not None:
            unique.setdefault(tuple(sorted(budget.n_remove.items())), budget)
    return sorted(unique.values(), key=lambda b: b.n_remove["attn"])


def _budget_pairs(pairs: list[Pair], structure: str) -> list[Pair]:
    # "mlp" puts the whole budget in the FFN: the result is stock at full benefit.
    return [p for p in pairs if structure != "mlp" or p.name == "ffn"]
