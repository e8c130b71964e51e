"""Whole-attention removal (2SSP's second stage): taking an attention submodule out, and choosing which.

``remove_attention`` puts ``NoAttention`` (the class faspx's DeciLM model file uses) in place of a
layer's attention and its input norm: the layer then adds only its FFN to the residual stream, and
the nemotron-nas export marks it ``attention.no_op``. ``search_attention`` is 2SSP's greedy search:
remove, one at a time, the attention whose removal raises the perplexity of a few calibration samples
least. It runs layer by layer like every other faspx walk, and keeps each layer's input for the
current model, so a candidate at layer i reruns only layers i..N-1: the same choices as rerunning
the whole model, for about half the forwards.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from faspx.adapters import Adapter
from faspx.exporters.decilm.modeling_decilm import NoAttention
from faspx.stream import Stream, stash_fits

log = logging.getLogger("faspx")


def remove_attention(layer: nn.Module, adapter: Adapter, index: int) -> None:
    """Take decoder layer ``index``'s attention submodule and its input norm out of ``layer`` (in place).

    Example:
        >>> from transformers import LlamaConfig
        >>> from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        >>> from faspx.adapters import LLAMA
        >>> layer = LlamaDecoderLayer(LlamaConfig(hidden_size=8, num_attention_heads=2, intermediate_size=16), 0)
        >>> remove_attention(layer, LLAMA, 0); has_attention(layer, LLAMA)
        False
    """
    setattr(layer, adapter.attn_module, NoAttention(index))
    setattr(layer, adapter.attn_norm, nn.Identity())


def has_attention(layer: nn.Module, adapter: Adapter) -> bool:
    """Whether ``layer`` still has its attention submodule (by class name: a checkpoint loaded with
    trust_remote_code has its own copy of the ``NoAttention`` class)."""
    return not adapter.attn_module or type(getattr(layer, adapter.attn_module)).__name__ != NoAttention.__name__


def attention_layers(model: nn.Module, adapter: Adapter) -> list[bool]:
    """For each decoder layer, whether it has attention (and so a KV cache entry)."""
    return [has_attention(layer, adapter) for layer in adapter.layers(model)]


def sample_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood of one sample (``logits`` 1 x T x V, ``ids`` T)."""
    return float(F.cross_entropy(logits[0, :-1].float(), ids[1:].to(logits.device), reduction="sum"))


@torch.no_grad()
def search_attention(model: nn.Module, adapter: Adapter, samples: torch.Tensor, depth: int, device: torch.device,
                     dtype: torch.dtype, *, progress: bool = True) -> tuple[list[int], list[dict]]:
    """Remove ``depth`` attention submodules of ``model``, greedily by perplexity on ``samples`` (n x T).

    Each step tries every layer that still has attention and removes the one whose removal gives the
    lowest perplexity (first index on ties). Returns the removed layers in the order chosen, and
    each step's {"removed", "ppl", "candidates": {layer: ppl}}.
    """
    layers = adapter.layers(model)
    head = [copy.deepcopy(model.get_submodule(name)).to(device=device, dtype=dtype) for name in adapter.head]
    stream = Stream.capture(model, layers, samples, device, dtype)
    layer_bytes = sum(p.numel() for p in layers.parameters()) * dtype.itemsize
    keep_on_device = stash_fits(layer_bytes, device)
    device_layers = [stream.on_device(layer) for layer in layers] if keep_on_device else None

    def work(i: int) -> nn.Module:
        return device_layers[i] if device_layers is not None else stream.on_device(layers[i])

    def run(i: int, module: nn.Module, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for x in hidden:
            y = module(x.to(device), **stream.layer_kwargs)
            out.append((y[0] if isinstance(y, tuple) else y).to(x.device))
        return out

    def perplexity(hidden: list[torch.Tensor]) -> float:
        nll = 0.0
        for x, ids in zip(hidden, samples, strict=True):
            y = x.to(device)
            for module in head:
                y = module(y)
            nll += sample_nll(y, ids)
        return math.exp(nll / (samples.shape[0] * (samples.shape[1] - 1)))

    inputs = [stream.hidden]  # inputs[i]: the input of layer i for the model as it is now
    for i in range(len(layers)):
        inputs.append(run(i, work(i), inputs[i]))
    removed: list[int] = []
    steps: list[dict] = []
    bar = tqdm(total=depth, desc="attention search", unit="removal", disable=not progress)
    for _ in range(depth):
        tried: dict[int, float] = {}
        for i, layer in enumerate(layers):
            if not has_attention(layer, adapter):
                continue
            trial = copy.deepcopy(work(i))
            remove_attention(trial, adapter, i)
            hidden = run(i, trial, inputs[i])
            for j in range(i + 1, len(layers)):
                hidden = run(j, work(j), hidden)
            tried[i] = perplexity(hidden)
        best = min(tried, key=lambda i: (tried[i], i))
        remove_attention(layers[best], adapter, best)
        if device_layers is not None:
            remove_attention(device_layers[best], adapter, best)
        for j in range(best, len(layers)):
            inputs[j + 1] = run(j, work(j), inputs[j])
        removed.append(best)
        steps.append({"removed": best, "ppl": tried[best], "candidates": tried})
        log.info("attention search: removed layer %d's attention (calibration ppl %.4g)", best, tried[best])
        bar.update(1)
        bar.set_postfix(layer=best, ppl=f"{tried[best]:.4g}")
    bar.close()
    return removed, steps
