"""Per-layer FFN widths (``--ffn-widths per-layer``): which widths are allowed and how the budget is shared.

The total number of FFN channels removed stays what the uniform plan removes; it is shared between
layers so that the sum of the layers' measured errors is least (``allocate``, an exact dynamic
programme). Widths are multiples of ``WIDTH_STEP``: the nemotron-nas config was first written with
``ffn_mult``, which its loaders round up to 256; it now gives the exact ``intermediate_size`` (vLLM reads
it as is), so finer steps are possible but not yet measured (docs/accuracy.md). Pure functions;
faspx.prune measures the errors.
"""

from __future__ import annotations

import torch

# The per-layer width search's step (the granularity of ffn_mult, which DeciLM's loaders round up to 256).
WIDTH_STEP = 256


def candidate_removals(width: int, step: int = WIDTH_STEP) -> list[int]:
    """Channel counts a layer may lose so that its width stays a positive multiple of ``step``, ascending.

    0 (layer untouched) is a candidate only when ``width`` is itself a multiple of ``step``.

    Example:
        >>> candidate_removals(1536)
        [0, 256, 512, 768, 1024, 1280]
        >>> candidate_removals(1000)
        [232, 488, 744]
    """
    return [width - w for w in range(width // step * step, 0, -step)]


def allocate(errors: torch.Tensor, removals: list[int], total: int) -> list[int]:
    """The candidate index of each layer minimising the summed error, removing ``total`` channels in all.

    ``errors[l, k]`` is layer l's error when it loses ``removals[k]`` channels (removals ascending,
    multiples of a common step apart). ``total`` is rounded to the nearest reachable count. Exact
    dynamic programme over layers x removed steps: O(layers x steps x candidates).

    Example:
        >>> errs = torch.tensor([[0.0, 1.0, 5.0], [0.0, 3.0, 9.0]])
        >>> allocate(errs, [0, 256, 512], 512)
        [1, 1]
        >>> allocate(errs, [0, 256, 512], 768)
        [2, 1]
    """
    n_layers, n_cand = errors.shape
    if n_cand != len(removals) or n_cand == 0:
        raise ValueError(f"errors has {n_cand} candidates per layer, removals {len(removals)}")
    step = removals[1] - removals[0] if n_cand > 1 else 1
    base = removals[0]
    offsets = [(r - base) // step for r in removals]
    if any(o * step + base != r for o, r in zip(offsets, removals, strict=True)):
        raise ValueError(f"removals {removals} are not evenly spaced")
    extra = round((total - n_layers * base) / step)
    extra = max(0, min(extra, n_layers * offsets[-1]))
    inf = float("inf")
    cost = [0.0] + [inf] * extra  # cost[u]: least error of the layers so far, having used u steps
    choice: list[list[int]] = []
    err = errors.double().tolist()
    for layer in range(n_layers):
        nxt = [inf] * (extra + 1)
        pick = [-1] * (extra + 1)
        for used, c in enumerate(cost):
            if c == inf:
                continue
            for k, off in enumerate(offsets):
                u = used + off
                if u > extra:
                    break
                if c + err[layer][k] < nxt[u]:
                    nxt[u], pick[u] = c + err[layer][k], k
        cost = nxt
        choice.append(pick)
    picks = []
    used = extra
    for layer in reversed(range(n_layers)):
        k = choice[layer][used]
        picks.append(k)
        used -= offsets[k]
    return picks[::-1]


def block_configs(widths: list[int], heads_per_kv_group: int, attention: list[bool] | None = None) -> list[dict]:
    """nemotron-nas ``block_configs``: each layer's attention (its GQA group size, or ``no_op`` where
    ``attention[i]`` is False) and its exact FFN width (``intermediate_size``, which vLLM reads as is).

    Example:
        >>> block = block_configs([1536, 700], 3, [True, False])[1]
        >>> block["attention"]["no_op"], block["ffn"]["intermediate_size"]
        (True, 700)
    """
    attention = attention or [True] * len(widths)
    return [
        {"attention": ({"no_op": False, "replace_with_linear": False, "n_heads_in_group": heads_per_kv_group}
                       if has_attention else {"no_op": True, "replace_with_linear": False}),
         "ffn": {"no_op": False, "replace_with_linear": False, "intermediate_size": w}}
        for w, has_attention in zip(widths, attention, strict=True)
    ]
