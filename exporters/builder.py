"""The fast ONNX path: onnxruntime-genai's model builder on a stock LLaMA-family checkpoint.

``python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32 -e cpu`` reads the weights and
writes the graph directly (no tracing): seconds where the dynamo exporter takes minutes. Its graph
fuses attention into ``GroupQueryAttention`` (rotary inside, no ``position_ids`` input) and keeps the
cache names faspx's graphs use (``past_key_values.{i}.key``, ``present.{i}.key``), with the head size
as a named dimension; ``genai_config.json`` is its own.

``--exporter auto`` takes this path wherever it can (``builder_reason``); what it cannot express is
left to the dynamo exporter (``builder_unsupported`` says why): OPT (no builder model type in faspx's
set), the nemotron-nas form (per-layer widths, removed attention), a head size that is not a multiple
of 16 (GroupQueryAttention refuses it on the CPU), ``--fp16``. Its fused attention takes the mask as
per-row lengths, so left-padded batches are not what it computes: the pipeline validates it against
PyTorch at batch 1 (``validate_onnx(..., batch=1)``), and faspx's own onnxruntime decoder
(``config.json``: ``faspx_exporter``) generates a padded batch row by row and takes right padding
only for scoring; onnxruntime-genai runs its batches its own way.

Example:
    >>> summary = export_builder(model, tokenizer, Path("out/onnx"), info)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from torch import nn

from faspx.adapters import attention_shape
from faspx.errors import FaspxError
from faspx.exporters.files import SIDE_FILES_BYTES, check_disk, dir_summary, write_config, write_side_files
from faspx.outputs import FaspInfo

log = logging.getLogger("faspx")

BUILDER_TYPES = ("llama", "mistral", "qwen2")


def builder_unsupported(config, stock: bool = True) -> str | None:
    """None when the builder can write the graph of a model with ``config`` (``stock``: one FFN width,
    attention in every layer), else why not. Cheap: a build checks it before pruning.

    Example:
        >>> from transformers import OPTConfig
        >>> builder_unsupported(OPTConfig())
        "faspx's builder path takes llama, mistral, qwen2, not opt: use --exporter dynamo"
    """
    if config.model_type not in BUILDER_TYPES:
        return f"faspx's builder path takes {', '.join(BUILDER_TYPES)}, not {config.model_type}: use --exporter dynamo"
    if not stock:
        return ("per-layer FFN widths or removed attention (the nemotron-nas form) are beyond the builder's config: "
                "use --exporter dynamo")
    _, _, head_dim = attention_shape(config)
    if head_dim % 16:
        return (f"head size {head_dim} is not a multiple of 16, which the builder's GroupQueryAttention needs on "
                "the CPU: use --exporter dynamo")
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return "onnxruntime-genai is not installed (pip install faspx[genai])"
    return None


def builder_reason(model: nn.Module, fp16: bool = False) -> str | None:
    """None when the builder can write ``model``'s graph (the in-memory model: one FFN width and
    attention in every layer), else why not.

    Example:
        >>> from transformers import OPTConfig, OPTForCausalLM
        >>> builder_reason(OPTForCausalLM(OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=1,
        ...                                         num_attention_heads=2, vocab_size=64)))[:40]
        "faspx's builder path takes llama, mistra"
    """
    from faspx.adapters import adapter_for
    from faspx.depth import has_attention

    if fp16:
        return "--fp16: the builder path writes float32 here (its fp16 graphs are for CUDA)"
    if model.config.model_type not in BUILDER_TYPES:
        return builder_unsupported(model.config)
    adapter = adapter_for(model.config)
    stock = (len({layer.mlp.down_proj.in_features for layer in model.model.layers}) == 1
             and all(has_attention(layer, adapter) for layer in model.model.layers))
    return builder_unsupported(model.config, stock)


def export_builder(model: nn.Module, tokenizer, out_dir: Path, fasp_info: FaspInfo | None = None,
                   progress: bool = False) -> dict:
    """Write ``out_dir/model.onnx`` (+ ``model.onnx.data``) with the builder from a float32 copy of
    ``model`` saved as a stock checkpoint, then config.json, generation config, tokenizer and fasp.json.
    Returns the summary of ``export_onnx``'s shape (exporter ``builder``, seconds of the builder run)."""
    reason = builder_reason(model)
    if reason:
        raise FaspxError(f"the builder cannot export this model: {reason}")
    out_dir = Path(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    check_disk(out_dir, int(n_params * 4 * 2.1) + SIDE_FILES_BYTES)  # the staged checkpoint and the graph
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="faspx-builder-") as staging:
        source, cache = Path(staging) / "hf", Path(staging) / "cache"
        model.float().save_pretrained(source)
        if tokenizer is not None:
            tokenizer.save_pretrained(source)
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out_dir),
                   "-p", "fp32", "-e", "cpu", "-c", str(cache)]
        log.info("onnxruntime-genai model builder: %s", " ".join(command[1:]))
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FaspxError(f"onnxruntime-genai's builder failed (exit {done.returncode}): {' | '.join(tail)}")
    write_config(model, out_dir, "float32", extra={"faspx_exporter": "builder"})
    write_side_files(model, tokenizer, out_dir, fasp_info)
    from faspx.exporters.onnx import graph_opset

    log.info("ONNX export (onnxruntime-genai builder) took %.1fs", seconds)
    return {**dir_summary(out_dir), "exporter": "builder", "opset": graph_opset(out_dir / "model.onnx"),
            "dtype": "float32", "onnxruntime_genai": "genai_config.json written by the builder",
            "external_data": (out_dir / "model.onnx.data").exists(), "seconds": seconds}


def is_builder_graph(onnx_dir: Path) -> bool:
    """Whether the export in ``onnx_dir`` was written by the builder (its config.json says so)."""
    path = Path(onnx_dir) / "config.json"
    try:
        return json.loads(path.read_text()).get("faspx_exporter") == "builder"
    except (OSError, ValueError):
        return False
