"""faspx prune / eval end to end on tiny saved models, and every bad input of the core CLI."""

import json
import time

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from faspx.cli import main
from tests.conftest import recipe, save_tiny


@pytest.fixture
def model_dir(tmp_path, opt_tokenizer):
    return save_tiny("llama", tmp_path / "dense", opt_tokenizer)


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def prune_args(model_dir, text_file, out, *extra):
    """`faspx prune` on 4 x 64 calibration tokens; the recipe is paper unless ``extra`` says otherwise."""
    recipe_args = () if "--recipe" in extra or "--distill" in extra else ("--recipe", "paper")
    return ("prune", "--model", model_dir, "--sparsity", "0.3", "--calib", text_file, "--nsamples", "4",
            "--seqlen", "64", "--out", out, "-q", *recipe_args, *extra)


def test_prune_writes_a_stock_directory_with_provenance(model_dir, text_file, tmp_path):
    out = tmp_path / "pruned"
    code, output = run(*prune_args(model_dir, text_file, out, "--distill", "2"))  # the default recipe otherwise
    assert code == 0, output
    info = json.loads((out / "fasp.json").read_text())
    assert info["sparsity"] == 0.3 and info["calibration"]["nsamples"] == 4 and info["form"] == "stock"
    assert info["recipe"]["name"] == "quality+distill=2" and info["recipe"]["selection"] == "obs"
    layers = info["prune"]["layers"]
    assert len(layers) == 2 and len(layers[0]["ffn"]["keep"]) < 160 and "attn" not in layers[0]  # structure mlp
    model = AutoModelForCausalLM.from_pretrained(out)  # stock class, no custom code
    assert model.config.intermediate_size == len(layers[0]["ffn"]["keep"])
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    # structure mlp cuts every removed weight out: nothing is left zeroed at full width
    assert info["params"]["decoder_linear_nonzero"] == info["params"]["decoder_linear_stored"]
    assert info["prune"]["removed_fraction"] == pytest.approx(0.3, abs=0.01)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_prune_with_distill_records_it(model_dir, text_file, tmp_path):
    out = tmp_path / "pruned"
    code, output = run(*prune_args(model_dir, text_file, out, "--distill", "2", "--distill-lr", "1e-5",
                                   "--distill-step-tokens", "5"))
    assert code == 0, output
    fasp = json.loads((out / "fasp.json").read_text())
    info = fasp["distill"]
    assert info["samples"] == 2 and info["lr"] == 1e-5 and info["held_out"] == 2
    assert info["step_tokens"] == 5 and info["steps"] == 2 * -(-fasp["calibration"]["seqlen"] // 5)
    assert info["kl_held_out_before"] > 0


def test_distill_needs_that_many_windows(model_dir, text_file, tmp_path):
    code, output = run(*prune_args(model_dir, text_file, tmp_path / "o", "--distill", "5"))
    assert code == 2 and "--distill 5" in output and "--nsamples 4" in output
    assert not (tmp_path / "o").exists()


def test_prune_per_layer_widths_writes_the_nemotron_nas_form(opt_tokenizer, text_file, tmp_path):
    wide = save_tiny("llama-wide", tmp_path / "wide", opt_tokenizer)
    out = tmp_path / "pruned"
    args = list(prune_args(wide, text_file, out, "--structure", "mlp", "--ffn-widths", "per-layer"))
    args[args.index("0.3")] = "0.35"
    code, output = run(*args)
    assert code == 0, output
    info = json.loads((out / "fasp.json").read_text())
    widths = info["prune"]["layer_widths"]
    assert info["recipe"]["ffn_widths"] == "per-layer" and info["form"] == "nemotron-nas" and len(set(widths)) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and (out / "tokenizer_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert [layer.mlp.down_proj.in_features for layer in model.model.layers] == widths
    code, output = run("eval", "--model", out, "--dataset", text_file, "--seqlen", "64", "--max-windows", "2", "-q")
    assert code == 0 and "perplexity" in output, output
    code, output = run("export", "--model", out, "--target", "onnx", "--out", tmp_path / "x")
    assert code == 2 and "per-layer" in output and not (tmp_path / "x").exists()
    (out / "modeling_decilm.py").write_text("import os  # not faspx's code\n")
    code, output = run("eval", "--model", out, "--dataset", text_file, "--seqlen", "64", "--max-windows", "2", "-q")
    # a directory whose code is not faspx's is never run with trust_remote_code
    assert code == 2 and "modeling_decilm.py" in output, output


@pytest.mark.parametrize("extra, message", [
    (("--ffn-widths", "per-layer"), "at least 512"),  # tiny llama's FFN is 160 wide
    (("--ffn-widths", "ragged"), "ragged"),
])
def test_per_layer_widths_bad_input(model_dir, text_file, tmp_path, extra, message):
    code, output = run(*prune_args(model_dir, text_file, tmp_path / "o", *extra))
    assert code == 2 and message in output, output
    assert not (tmp_path / "o").exists()


def test_build_of_a_nemotron_nas_recipe_benchmarks_it(model_dir, text_file, tmp_path):
    args = ["build", *prune_args(model_dir, text_file, tmp_path / "o", "--recipe", "2ssp")[1:], "--target", "hf",
            "--bench"]
    code, output = run(*args)
    assert code == 0, output
    report = json.loads((tmp_path / "o" / "bench" / "report.json").read_text())
    assert report["results"] and report["pruned"]["attention_layers"] < report["dense"]["attention_layers"]


@torch.no_grad()
def test_saved_model_reloads_with_the_same_logits(model_dir, text_file, opt_tokenizer, tmp_path):
    from faspx import prune
    from faspx.data import calibration_ids

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prune(model, calibration_ids(opt_tokenizer, str(text_file), 4, 64), 0.3, recipe("paper"), progress=False)
    model.save_pretrained(tmp_path / "p")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    ids = torch.randint(0, 50000, (2, 24))
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_eval_prints_perplexity_and_writes_json(model_dir, text_file, tmp_path):
    code, output = run("eval", "--model", model_dir, "--dataset", text_file, "--seqlen", "64",
                       "--max-windows", "2", "--json", tmp_path / "e.json", "-q")
    assert code == 0, output
    assert "perplexity" in output and json.loads((tmp_path / "e.json").read_text())["windows"] == 2


@pytest.mark.parametrize("sparsity, pattern", [("-0.1", r"\[0, 0\.\d{4}\)"), ("0.99", r"\[0, 0\.\d{4}\)"),
                                               ("abc", "not a valid float")])
def test_bad_sparsity_is_a_usage_error(model_dir, text_file, tmp_path, sparsity, pattern):
    args = list(prune_args(model_dir, text_file, tmp_path / "o"))
    args[args.index("0.3")] = sparsity
    code, output = run(*args)
    assert code == 2
    import re

    assert re.search(pattern, output), output
    assert not (tmp_path / "o").exists()


def test_unknown_architecture(tmp_path, text_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "g")
    code, output = run(*prune_args(tmp_path / "g", text_file, tmp_path / "o"))
    assert code == 2 and "gpt2" in output and "llama" in output and "opt" in output


def test_missing_model_path(tmp_path, text_file):
    code, output = run(*prune_args(tmp_path / "nowhere", text_file, tmp_path / "o"))
    assert code == 2 and "does not exist" in output


def test_hub_id_while_offline_fails_fast(tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    code, output = run(*prune_args("facebook/opt-no-such-model", text_file, tmp_path / "o"))
    assert code == 1 and "offline" in output and "local model directory" in output
    assert time.perf_counter() - start < 15


def test_calibration_too_short(model_dir, tmp_path):
    (tmp_path / "short.txt").write_text("too short")
    code, output = run(*prune_args(model_dir, tmp_path / "short.txt", tmp_path / "o"))
    assert code == 2 and "fewer than" in output
    assert not (tmp_path / "o").exists()


def test_existing_out_needs_force(model_dir, text_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, output = run(*prune_args(model_dir, text_file, out))
    assert code == 2 and "--force" in output and (out / "keep.txt").exists()
    code, output = run(*prune_args(model_dir, text_file, out, "--force"))
    assert code == 0, output
    assert not (out / "keep.txt").exists() and (out / "fasp.json").exists()


@pytest.mark.parametrize("fault", [KeyboardInterrupt, RuntimeError("disk on fire")])
def test_crash_mid_write_leaves_nothing(model_dir, text_file, tmp_path, monkeypatch, fault):
    import faspx.outputs

    def boom(*_a, **_k):
        raise fault

    # fasp.json is the last file the HF exporter writes: the crash comes after the weights.
    monkeypatch.setattr(faspx.outputs, "write_json", boom)
    code, output = run(*prune_args(model_dir, text_file, tmp_path / "o"))
    assert code == 1 and "error" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "dense"]


def test_verbose_shows_the_traceback(tmp_path, text_file):
    code, output = run(*prune_args(tmp_path / "nowhere", text_file, tmp_path / "o"), "-v")
    assert code == 2 and "Traceback" in output
    code, output = run(*prune_args(tmp_path / "nowhere", text_file, tmp_path / "o"))
    assert "Traceback" not in output


def test_eval_caps_seqlen_at_the_models_positions_and_prints_before_writing(model_dir, text_file, tmp_path,
                                                                            monkeypatch):
    import faspx.outputs

    code, output = run("eval", "--model", model_dir, "--dataset", text_file, "--seqlen", "4096", "--max-windows",
                       "2", "--json", tmp_path / "e.json")
    assert code == 0, output
    assert "windows of 128" in output and "above the model's 128 positions" in output  # tiny llama: 128
    assert json.loads((tmp_path / "e.json").read_text())["seqlen"] == 128

    def full_disk(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(faspx.outputs, "write_json", full_disk)
    code, output = run("eval", "--model", model_dir, "--dataset", text_file, "--seqlen", "64", "--max-windows", "1",
                       "--json", tmp_path / "f.json", "-q")
    assert code == 1 and "No space left" in output
    assert output.index("perplexity") < output.index("error:")  # the result reached the user first


def test_verbose_failures_do_not_ask_for_verbose(model_dir, text_file, tmp_path, monkeypatch):
    import faspx.pipeline

    def broken(*_a, **_k):
        raise RuntimeError("something unforeseen")

    monkeypatch.setattr(faspx.pipeline, "prune_model", broken)
    code, output = run(*prune_args(model_dir, text_file, tmp_path / "o"))
    assert code == 1 and "something unforeseen (run with -v for the traceback)" in output
    code, output = run(*prune_args(model_dir, text_file, tmp_path / "o"), "-v")
    assert code == 1 and "Traceback" in output and "run with -v" not in output


def test_atol_help_says_the_bound_is_relative():
    for command in ("export", "build"):
        code, output = run(command, "--help")
        assert code == 0 and "atol x max |logit|" in " ".join(output.split())


def test_log_lines_go_through_the_progress_bars_writer():
    import logging

    import click

    from faspx.cli import verbosity

    seen = []

    @click.command()
    @verbosity
    def probe(progress):
        seen.extend((type(h).__module__, h.level) for h in logging.getLogger().handlers)

    assert CliRunner().invoke(probe, ["-q"]).exit_code == 0
    # tqdm's handler writes with tqdm.write, above the bars; -q still silences INFO lines
    assert seen == [("tqdm.contrib.logging", logging.WARNING)]


def test_generate_takes_cuda_n_like_the_other_commands(model_dir):
    code, output = run("generate", "--model", model_dir, "--prompt", "Hi", "--device", "cuda:1")
    if torch.cuda.device_count() > 1:
        assert code == 0, output
    else:
        assert code == 2 and "--device cuda:1" in output and "no such option" not in output.lower()
