"""The recipes end to end through the CLI on tiny OPT and LLaMA-GQA models, and what fasp.json makes repeatable."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from faspx.cli import main
from faspx.outputs import FaspInfo
from faspx.recipes import PRESETS
from tests.conftest import save_tiny

DATA = Path(__file__).parent / "data"
# Written at ec64d79, before the recipes and the single layer walk, by that commit's default
# `faspx prune --model DIR --sparsity 0.3 --calib calib.txt --nsamples 8 --seqlen 32 --out OUT`
# (DIR: save_tiny(kind), calib.txt: the text_file fixture): the sha256 of its model.safetensors, and
# its decoder layers in tests/data/KIND-paper-layers.safetensors.
PAPER_SHA256 = {"opt": "b865a2c2cbbe71bebf049f953fe16a103862ba032eb4c1d7586ce6285fabf5f2",
                "llama": "44e8e173cb08c330df6d8c650659321d8203311d6fe70c81ffaf1147e79eef8c"}


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def prune(model_dir, text_file, out, *extra, sparsity="0.3"):
    return run("prune", "--model", model_dir, "--sparsity", sparsity, "--calib", text_file, "--nsamples", "8",
               "--seqlen", "32", "--out", out, "-q", *extra)


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_the_paper_recipe_writes_what_the_old_default_wrote(kind, opt_tokenizer, text_file, tmp_path):
    """The weights match the pre-refactor output to float32 rounding on every CPU, and bit for bit (the
    whole file: header, every tensor) wherever the CPU rounds as the recording machine did."""
    dense = save_tiny(kind, tmp_path / "dense", opt_tokenizer)
    code, output = prune(dense, text_file, tmp_path / "out", "--recipe", "paper")
    assert code == 0, output
    written = load_file(tmp_path / "out" / "model.safetensors")
    reference = load_file(DATA / f"{kind}-paper-layers.safetensors")
    assert reference and set(reference) <= set(written)
    for name, tensor in reference.items():
        assert written[name].shape == tensor.shape, name  # the same channels were kept
        torch.testing.assert_close(written[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    if all(torch.equal(written[name], tensor) for name, tensor in reference.items()):
        sha = hashlib.sha256((tmp_path / "out" / "model.safetensors").read_bytes()).hexdigest()
        assert sha == PAPER_SHA256[kind]


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("name", [n for n, r in PRESETS.items() if r.stock])
def test_every_stock_preset_runs_and_loads_with_the_stock_class(kind, name, opt_tokenizer, text_file, tmp_path):
    dense = save_tiny(kind, tmp_path / "dense", opt_tokenizer)
    extra = ("--distill", "2") if PRESETS[name].distill else ()  # 8 calibration windows: 2 distilled, 4 held out
    code, output = prune(dense, text_file, tmp_path / "out", "--recipe", name, *extra)
    assert code == 0, output
    info = FaspInfo.read(tmp_path / "out" / "fasp.json")
    assert info.form == "stock" and info.recipe["name"].split("+")[0] == name
    assert (info.distill is not None) == bool(PRESETS[name].distill)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # no custom code
    assert info.prune["removed_fraction"] == pytest.approx(0.3, abs=0.02)
    assert torch.isfinite(model(torch.randint(0, 1000, (1, 8))).logits).all()


def test_the_max_preset_writes_nemotron_nas_on_llama_and_refuses_opt(opt_tokenizer, text_file, tmp_path):
    wide = save_tiny("llama-wide", tmp_path / "wide", opt_tokenizer)
    code, output = prune(wide, text_file, tmp_path / "out", "--recipe", "max", "--distill", "2", sparsity="0.35")
    assert code == 0, output
    info = FaspInfo.read(tmp_path / "out" / "fasp.json")
    assert info.form == "nemotron-nas" and len(set(info.prune["layer_widths"])) > 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)  # as documented
    assert [layer.mlp.down_proj.in_features for layer in model.model.layers] == info.prune["layer_widths"]
    opt = save_tiny("opt", tmp_path / "opt", opt_tokenizer)
    code, output = prune(opt, text_file, tmp_path / "o2", "--recipe", "max", "--distill", "2")
    assert code == 2 and "cannot take it" in output and not (tmp_path / "o2").exists()


def test_a_fasp_json_repeats_its_run(opt_tokenizer, text_file, tmp_path):
    dense = save_tiny("llama", tmp_path / "dense", opt_tokenizer)
    code, output = prune(dense, text_file, tmp_path / "a", "--recipe", "fast", "--selection", "obs")
    assert code == 0, output
    code, output = prune(dense, text_file, tmp_path / "b", "--recipe", tmp_path / "a" / "fasp.json")
    assert code == 0, output
    a, b = (json.loads((tmp_path / d / "fasp.json").read_text()) for d in "ab")
    assert a["recipe"] == b["recipe"] and a["recipe"]["selection"] == "obs"
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_the_default_recipe_is_quality_and_help_says_so():
    code, output = run("prune", "--help")
    assert code == 0 and "quality" in output and "--recipe paper" in output
    code, output = run("recipes")
    assert code == 0 and all(name in output for name in PRESETS) and "quality*" in output


def test_a_bad_recipe_is_a_usage_error_before_any_load(tmp_path, text_file):
    code, output = prune(tmp_path / "nowhere", text_file, tmp_path / "o", "--recipe", "fastest")
    assert code == 2 and "neither a preset" in output and "paper" in output
