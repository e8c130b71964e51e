"""faspx export / faspx generate end to end on a tiny pruned model, and their bad input."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import faspx
from faspx.cli import main
from tests.conftest import OPT_VOCAB, SHARED, calib, recipe, save_tiny

PROMPTS = ["Hello world", "The quick brown fox jumps"]


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    """A tiny LLaMA (GQA) with the OPT tokenizer's vocabulary, pruned at 0.3 and saved with fasp.json."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the OPT tokenizer of these tests lives beside the repository")
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "opt")
    directory = save_tiny("llama", tmp_path_factory.mktemp("model") / "pruned", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():  # sharper than HF's init, so greedy text depends on the prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3)
    faspx.prune(model, calib(n=4, seqlen=16) % OPT_VOCAB, 0.3, recipe("paper"), progress=False)
    model.save_pretrained(directory)
    (directory / "fasp.json").write_text(json.dumps({"sparsity": 0.3, "source_model": "tiny"}))
    return directory


@pytest.fixture(scope="module")
def exported(pruned_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "out"
    code, output = run("export", "--model", pruned_dir, "--target", "all", "--out", out, "--dtype", "bfloat16",
                       "-q")
    return out, code, output


def test_export_all_writes_hf_and_validated_onnx(exported, pruned_dir):
    out, code, output = exported
    assert code == 0, output
    assert "hf/ (bfloat16)" in output and "model.safetensors" in output
    assert "onnx/ (float32, dynamo exporter, opset 18)" in output and "model.onnx" in output
    assert "ONNX vs PyTorch max |logits diff|: prefill" in output and "= 0.001 x max |logit|" in output
    for sub in ("hf", "onnx"):
        assert json.loads((out / sub / "fasp.json").read_text())["sparsity"] == 0.3
        assert (out / sub / "tokenizer_config.json").exists()
        assert "auto_map" not in json.loads((out / sub / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.config.intermediate_size == json.loads((pruned_dir / "config.json").read_text())[
        "intermediate_size"] < 160
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no temporary directory left


def test_generate_with_onnx_matches_pytorch(exported, pruned_dir):
    out, code, output = exported
    assert code == 0, output
    args = [a for p in PROMPTS for a in ("--prompt", p)]
    code, onnx_text = run("generate", "--model", out / "onnx", *args, "--max-new-tokens", "8", "--device", "cpu",
                          "-q")
    assert code == 0, onnx_text
    lines = onnx_text.strip().splitlines()
    # The same greedy continuation from PyTorch on the (fp32) pruned model, batch of 2 with left padding.
    tokenizer = AutoTokenizer.from_pretrained(out / "onnx", padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert enc["attention_mask"].min() == 0  # the prompts differ in length: left padding is exercised
    ids = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert all(texts)
    assert lines == [p + t for p, t in zip(PROMPTS, texts, strict=True)]


def test_generate_with_onnxruntime_genai_matches_onnxruntime(exported):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install faspx[genai])")
    out, code, output = exported
    assert code == 0, output
    for prompt in PROMPTS:  # one at a time: genai runs batch 1, onnxruntime then needs no padding either
        common = ["generate", "--model", out / "onnx", "--prompt", prompt, "--max-new-tokens", "8", "-q"]
        code, genai_text = run(*common, "--runtime", "genai")
        assert code == 0, genai_text
        code, ort_text = run(*common, "--runtime", "onnxruntime")
        assert code == 0, ort_text
        assert genai_text == ort_text and len(genai_text.strip()) > len(prompt)


def test_generate_refuses_a_runtime_that_does_not_fit_the_directory(exported):
    out, _, _ = exported
    code, output = run("generate", "--model", out / "hf", "--prompt", "hi", "--runtime", "genai")
    assert code == 2 and "no model.onnx" in output
    code, output = run("generate", "--model", out / "onnx", "--prompt", "hi", "--runtime", "torch")
    assert code == 2 and "is an ONNX export" in output
    code, output = run("generate", "--model", out / "onnx", "--prompt", "hi", "--runtime", "genai",
                       "--device", "cuda")
    assert code == 2 and "--device cpu" in output


def test_generate_with_an_hf_directory(exported):
    out, code, output = exported
    assert code == 0, output
    code, text = run("generate", "--model", out / "hf", "--prompt", PROMPTS[0], "--max-new-tokens", "4", "-q")
    assert code == 0, text
    assert text.startswith(PROMPTS[0])


def test_the_summary_gives_the_opset_the_file_declares(pruned_dir, tmp_path):
    import onnx

    code, output = run("export", "--model", pruned_dir, "--target", "onnx", "--opset", "14", "--out", tmp_path / "o",
                       "-q")
    assert code == 0, output
    declared = onnx.load(str(tmp_path / "o" / "onnx" / "model.onnx"), load_external_data=False).opset_import
    assert [o.version for o in declared if o.domain in ("", "ai.onnx")] == [14]
    assert "torchscript exporter, opset 14" in output  # dynamo would have written 18


def test_onnx_export_and_validation_show_their_steps(pruned_dir, tmp_path):
    result = CliRunner().invoke(main, ["export", "--model", str(pruned_dir), "--target", "onnx", "--out",
                                       str(tmp_path / "o"), "--exporter", "torchscript"])
    assert result.exit_code == 0, result.output
    assert "ONNX export: 2/2 steps" in result.output and "ONNX validation: 5/5 steps" in result.output
    assert "decode step 3" in result.output


def test_bad_input_exits_2(exported, pruned_dir, tmp_path):
    out, _, _ = exported
    code, output = run("export", "--model", pruned_dir, "--target", "bogus", "--out", tmp_path / "x")
    assert code == 2 and "bogus" in output
    code, output = run("export", "--model", pruned_dir, "--out", out, "-q")
    assert code == 2 and "already exists" in output and "--force" in output
    (tmp_path / "empty").mkdir()
    code, output = run("export", "--model", tmp_path / "empty", "--out", tmp_path / "y", "-q")
    assert code == 2 and "config.json" in output
    code, output = run("export", "--model", pruned_dir, "--out", tmp_path / "z", "--atol", "0", "-q")
    assert code == 2 and "--atol" in output
    code, output = run("generate", "--model", tmp_path / "empty", "--prompt", "hi", "-q")
    assert code == 2 and "config.json" in output
    code, output = run("generate", "--model", out / "onnx", "--prompt", "hi", "--max-new-tokens", "0")
    assert code == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_eval_runs_an_onnx_export_like_pytorch(tmp_path, opt_tokenizer, text_file):
    """faspx eval on OUT/onnx (onnxruntime) gives the perplexity PyTorch gives on OUT/hf."""
    import re

    from click.testing import CliRunner

    from faspx.cli import main
    from tests.conftest import save_tiny

    dense = save_tiny("llama", tmp_path / "dense", opt_tokenizer)
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(main, ["export", "--model", str(dense), "--target", "all", "--out", str(out), "-q",
                                  "--exporter", "torchscript"])
    assert result.exit_code == 0, result.output
    ppl = {}
    for kind in ("hf", "onnx"):
        result = runner.invoke(main, ["eval", "--model", str(out / kind), "--dataset", str(text_file), "--seqlen", "64",
                                      "--max-windows", "3", "-q"])
        assert result.exit_code == 0, result.output
        ppl[kind] = float(re.search(r"perplexity ([0-9.]+)", result.output).group(1))
    assert abs(ppl["onnx"] - ppl["hf"]) < 1e-3 * ppl["hf"]
