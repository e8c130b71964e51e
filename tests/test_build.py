"""faspx build end to end: prune -> export (hf + onnx) -> validate, offline from a local directory."""

import json
import os
import stat

import pytest
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from faspx.cli import main
from tests.conftest import save_tiny


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture
def model_dir(tmp_path, opt_tokenizer):
    return save_tiny("qwen2", tmp_path / "dense", opt_tokenizer)


def test_build_all_produces_the_layout(model_dir, text_file, tmp_path, monkeypatch):
    import faspx.benchmarks.run

    monkeypatch.setattr(faspx.benchmarks.run, "ONNX_CACHE", tmp_path / "onnx-cache")
    out = tmp_path / "build"
    code, output = run("build", "--model", model_dir, "--sparsity", "0.3", "--calib", text_file, "--nsamples", "4",
                       "--seqlen", "64", "--distill", "2", "--target", "all", "--out", out, "--eval",
                       "--eval-dataset", text_file,
                       "--eval-windows", "2", "--bench", "-q")
    assert code == 0, output
    assert {p.name for p in out.iterdir()} == {"hf", "onnx", "fasp.json", "build.log", "bench"}
    assert (out / "bench" / "report.md").exists() and (out / "bench" / "report.png").stat().st_size > 0
    info = json.loads((out / "fasp.json").read_text())
    assert info["recipe"]["name"] == "quality+distill=2" and info["form"] == "stock"
    keep = info["prune"]["layers"][0]["ffn"]["keep"]
    assert 0 < len(keep) < 160 and keep == sorted(keep)
    assert info["exports"]["validation"]["prefill_max_abs_diff"] < 1e-3
    assert info["eval"]["dense"] > 1 and info["eval"]["pruned"] > 1
    assert AutoModelForCausalLM.from_pretrained(out / "hf").config.intermediate_size == len(keep)
    assert (out / "onnx" / "model.onnx").stat().st_size > 0
    umask = os.umask(0)
    os.umask(umask)  # the output is readable as the umask says, not 0700/0600 as mkdtemp and writers leave it
    for path in (out, out / "hf", out / "hf" / "model.safetensors", out / "onnx" / "model.onnx"):
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, path
    log = (out / "build.log").read_text()
    assert "validating the ONNX graph" in log and log.count("writing the HF checkpoint") == 1
    first = log.splitlines()[0].split(" ", 2)[2]  # after the date and time
    assert first.startswith(f"faspx build --model {model_dir} --sparsity 0.3 --recipe quality ")
    assert "-q" not in first.split()  # a word: --quantize-eval, logged with its default, contains "-q"
    assert "built" in output and "ONNX vs PyTorch" in output and "perplexity" in output


def test_build_bad_target_and_existing_out(model_dir, text_file, tmp_path):
    args = ["build", "--model", model_dir, "--sparsity", "0.3", "--calib", text_file, "--out", tmp_path / "o"]
    code, output = run(*args, "--target", "tflite")
    assert code == 2 and "tflite" in output
    (tmp_path / "o").mkdir()
    code, output = run(*args)
    assert code == 2 and "--force" in output
