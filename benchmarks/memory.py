"""Memory figures: weights, KV cache, disk, and the process or device peaks."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import psutil
import torch


def rss_bytes() -> int:
    """Resident memory of this process now."""
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """The process's resident-memory high-water mark so far (it never goes down)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def disk_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (or of the file itself)."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the stored parameters (``parameters()`` yields tied ones once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_read_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one decode step at batch 1 reads: everything but the input embedding table (one row
    of it is read), the lm_head included. Zeroed-but-stored weights are read like any others."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    skipped = 0 if tied else embed.numel() * embed.element_size()
    return weight_bytes(model) - skipped


def kv_cache_bytes(config, batch: int, length: int, bytes_per_value: int) -> int:
    """Keys and values of every layer for ``batch`` sequences of ``length`` tokens."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers * 2 * batch * kv_heads * length * head_dim * bytes_per_value
