"""vLLM (its CPU build, in its own environment: `make vllm`) serves faspx's outputs as transformers runs
them: a stock pruned LLaMA-GQA and a nemotron-nas (per-layer widths) one. Two engine starts in all."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from faspx.benchmarks.vllm_client import VllmEngine, unavailable_reason
from tests.conftest import SHARED, assert_on_greedy_path, save_tiny, sharpened

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
PROMPTS = [[2, 100, 2000, 31, 7], [2, 9, 4000, 12000, 5, 77, 300]]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
    import pyarrow.parquet as pq

    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the shared test data lives beside the repository")
    rows = pq.read_table(SHARED / "data" / "wikitext2-raw-v1-test.parquet").column("text").to_pylist()
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("\n\n".join(rows[:1200]))
    return path


def pruned(kind: str, tmp_path, text_path, *extra) -> tuple:
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from faspx.cli import main

    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "opt")
    dense = save_tiny(kind, tmp_path / "dense", tokenizer)
    sharpened(AutoModelForCausalLM.from_pretrained(dense)).save_pretrained(dense)
    out = tmp_path / "pruned"
    result = CliRunner().invoke(main, ["prune", "--model", str(dense), "--sparsity", "0.3", "--calib",
                                       str(text_path), "--nsamples", "4", "--seqlen", "64", "--out", str(out), "-q",
                                       *extra])
    assert result.exit_code == 0, result.output
    return out


def assert_same_greedy_path(model_dir, tokens, logprobs, trust_remote_code=False):
    """vLLM's greedy tokens are transformers' argmax at every step (or a near-tie, < 1e-3 apart), and
    its log-probabilities are transformers' on the same path."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code).eval()
    for prompt, new, lps in zip(PROMPTS, tokens, logprobs, strict=True):
        assert len(new) == NEW_TOKENS
        path = assert_on_greedy_path(model, prompt, new)
        for step, (token, lp) in enumerate(zip(new, lps, strict=True)):
            assert abs(float(path[step, token]) - lp) < 1e-3, (step, float(path[step, token]), lp)


def test_vllm_serves_a_stock_pruned_llama_gqa_as_transformers_runs_it(tmp_path, text_path):
    out = pruned("llama32", tmp_path, text_path, "--recipe", "paper")  # V/O zeroed at full width + FFN cut
    with VllmEngine(out, max_len=128) as engine:
        tokens, logprobs = engine.generate(PROMPTS, NEW_TOKENS)
        memory = engine.memory()
    assert_same_greedy_path(out, tokens, logprobs)
    assert memory["rss_bytes"] > 0 and len(memory["processes"]) > 1  # the engine runs in processes of its own


def test_vllm_serves_the_nemotron_nas_form(tmp_path, text_path):
    import json

    out = pruned("llama32-wide", tmp_path, text_path, "--recipe", "max", "--distill", "0")
    info = json.loads((out / "fasp.json").read_text())
    assert info["form"] == "nemotron-nas" and len(set(info["prune"]["layer_widths"])) > 1
    with VllmEngine(out, max_len=128, trust_remote_code=True) as engine:
        tokens, logprobs = engine.generate(PROMPTS, NEW_TOKENS)
    assert_same_greedy_path(out, tokens, logprobs, trust_remote_code=True)


def test_vllm_serves_2ssp_layers_without_attention(tmp_path, text_path):
    import json

    out = pruned("llama32-deep", tmp_path, text_path, "--recipe", "2ssp", "--sparsity", "0.5")
    info = json.loads((out / "fasp.json").read_text())
    removed = info["prune"]["attention_removed"]
    assert info["form"] == "nemotron-nas" and len(removed) == 2 and 0 not in removed
    blocks = json.loads((out / "config.json").read_text())["block_configs"]
    assert [i for i, b in enumerate(blocks) if b["attention"]["no_op"]] == sorted(removed)
    # exact widths: vLLM reads ffn.intermediate_size as is (no 256-step rounding)
    assert {b["ffn"]["intermediate_size"] for b in blocks} == {info["prune"]["layer_widths"][0]
                                                              if info["prune"]["layer_widths"] else
                                                              json.loads((out / "config.json").read_text())[
                                                                  "intermediate_size"]}
    with VllmEngine(out, max_len=128, trust_remote_code=True) as engine:
        tokens, logprobs = engine.generate(PROMPTS, NEW_TOKENS)
    assert_same_greedy_path(out, tokens, logprobs, trust_remote_code=True)
