"""Perplexity by the SparseGPT/Wanda protocol: non-overlapping windows, mean token loss."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from faspx.errors import UsageError


@torch.no_grad()
def perplexity(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, seqlen: int = 2048, *,
               max_windows: int | None = None, device: str | torch.device = "cpu", progress: bool = True) -> float:
    """exp(mean next-token loss) over the first ``max_windows`` non-overlapping windows of ``ids``.

    ``model`` is used in place (moved to ``device``), or is any function from a (1 x seqlen) token
    window to its logits (an onnxruntime session, say); ``ids`` is a (1 x N) token row.

    Example:
        >>> import torch; from transformers import AutoModelForCausalLM, LlamaConfig
        >>> m = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, vocab_size=50)).eval()
        >>> perplexity(m, torch.randint(0, 50, (1, 64)), 32, progress=False) > 1
        True
    """
    if seqlen < 2 or (max_windows is not None and max_windows < 1):
        raise UsageError(f"need seqlen >= 2 and max_windows >= 1 (got {seqlen}, {max_windows})")
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise UsageError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if isinstance(model, nn.Module):
        net = model.to(device)

        def model(x):
            return net(input_ids=x.to(device), use_cache=False).logits
    total = 0.0
    for w in tqdm(range(n_windows), desc="perplexity", unit="window", disable=not progress):
        x = ids[:, w * seqlen:(w + 1) * seqlen]
        logits = model(x).float().to(x.device)
        loss = nn.functional.cross_entropy(logits[0, :-1], x[0, 1:])
        total += float(loss)
    return math.exp(total / n_windows)
