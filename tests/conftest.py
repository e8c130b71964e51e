"""Tiny models built from configs (OPT, LLaMA with GQA, Qwen2, Mistral) and the shared test data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared"
VOCAB = 256

TINY_CONFIGS = {
    "opt": lambda: OPTConfig(hidden_size=64, ffn_dim=192, num_hidden_layers=2, num_attention_heads=4,
                             vocab_size=VOCAB, max_position_embeddings=128, word_embed_proj_dim=64),
    # OPT-350m's layout: post-LayerNorm and a projected embedding width.
    "opt350": lambda: OPTConfig(hidden_size=64, ffn_dim=192, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=VOCAB, max_position_embeddings=128, word_embed_proj_dim=32,
                                do_layer_norm_before=False),
    "llama": lambda: LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                 vocab_size=VOCAB, max_position_embeddings=128),
    # FFN wide enough for --ffn-widths per-layer (widths in steps of 256); three layers to share it.
    "llama-wide": lambda: LlamaConfig(hidden_size=64, intermediate_size=1024, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      vocab_size=VOCAB, max_position_embeddings=128),
    # vLLM's CPU attention takes head sizes 32, 64, 80, ...: the tiny models it runs have head_dim 32.
    "llama32": lambda: LlamaConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   vocab_size=VOCAB, max_position_embeddings=256),
    "llama32-wide": lambda: LlamaConfig(hidden_size=128, intermediate_size=1024, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                        vocab_size=VOCAB, max_position_embeddings=256),
    # Deep enough for 2SSP's attention removal (FFN 3x the attention's parameters, as in SmolLM2).
    "llama-deep": lambda: LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=8,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      vocab_size=VOCAB, max_position_embeddings=128),
    "llama32-deep": lambda: LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=8,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                        vocab_size=VOCAB, max_position_embeddings=256),
    "qwen2": lambda: Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                 max_position_embeddings=128),
    "mistral": lambda: MistralConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, vocab_size=VOCAB,
                                     max_position_embeddings=128, sliding_window=None),
}


def tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A random-initialised tiny model in eval mode, with non-zero biases where the family has them."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[kind](), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)  # HF initialises biases to 0; real checkpoints do not have that
    return model


def calib(n: int = 8, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    """Random calibration tokens for tiny models."""
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["opt", "opt350", "llama", "qwen2", "mistral"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the shared test data lives beside the repository")
    return SHARED


@pytest.fixture
def opt_tokenizer(shared):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared / "tokenizers" / "opt")


OPT_VOCAB = 50272  # the OPT tokenizer's ids fit


def save_tiny(kind: str, directory: Path, tokenizer) -> Path:
    """A tiny model with the OPT tokenizer's vocabulary, saved as an HF directory with that tokenizer."""
    config = TINY_CONFIGS[kind]()
    config.vocab_size = OPT_VOCAB
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def text_file(tmp_path, shared) -> Path:
    """About 60k tokens of real English (the first WikiText-2 test rows) as a .txt file."""
    import pyarrow.parquet as pq

    rows = pq.read_table(shared / "data" / "wikitext2-raw-v1-test.parquet").column("text").to_pylist()
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(rows[:1200]))
    return path


def recipe(name: str = "paper", **overrides):
    """A recipe preset with overrides (tests use ``paper``, the published method, unless they say otherwise)."""
    from faspx.recipes import get_recipe

    return get_recipe(name, **overrides)


@torch.no_grad()
def sharpened(model: torch.nn.Module, factor: float = 4.0) -> torch.nn.Module:
    """``model`` with its matrices scaled up in place: sharper than HF's init, so greedy choices have real
    margins (runtimes compared token for token then agree unless the model itself is near a tie)."""
    for p in model.parameters():
        if p.dim() > 1:
            p.mul_(factor)
    return model


@torch.no_grad()
def assert_on_greedy_path(model: torch.nn.Module, prompt: list[int], new: list[int], tie: float = 1e-3) -> torch.Tensor:
    """Every token of ``new`` is ``model``'s argmax after ``prompt`` + the tokens before it, or a near-tie
    (top two logits within ``tie``). Returns the log-probabilities along the path."""
    logp = model(torch.tensor([prompt + new])).logits[0].float().log_softmax(-1)
    for step, token in enumerate(new):
        row = logp[len(prompt) - 1 + step]
        top2 = row.topk(2).values
        assert token == int(row.argmax()) or float(top2[0] - top2[1]) < tie, (step, token, int(row.argmax()))
    return logp[len(prompt) - 1:len(prompt) - 1 + len(new)]
