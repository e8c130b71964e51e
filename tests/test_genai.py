"""onnxruntime-genai runs faspx's ONNX export as it is (genai_config.json), greedy like transformers."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from faspx.benchmarks.greedy_check import genai_tokens
from faspx.cli import main
from faspx.exporters.onnx import export_onnx
from tests.conftest import assert_on_greedy_path, sharpened, tiny_model

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install faspx[genai])")
PROMPTS = [[1, 17, 200, 31], [1, 9, 40, 120, 5, 77]]
NEW_TOKENS = 12


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_genai_runs_the_export_on_transformers_greedy_path(kind, tmp_path):
    model = sharpened(tiny_model(kind))
    summary = export_onnx(model, None, tmp_path / "onnx", exporter="torchscript")  # same graph layout, faster
    assert summary["onnxruntime_genai"] == "genai_config.json written"
    config = json.loads((tmp_path / "onnx" / "genai_config.json").read_text())
    assert config["model"]["type"] == kind and config["model"]["decoder"]["num_key_value_heads"] == \
        model.config.num_key_value_heads
    tokens = genai_tokens(tmp_path / "onnx", PROMPTS, NEW_TOKENS)["tokens"]
    for prompt, new in zip(PROMPTS, tokens, strict=True):
        assert len(new) == NEW_TOKENS
        assert_on_greedy_path(model, prompt, new)


def test_an_opt_export_says_why_genai_cannot_run_it(tmp_path):
    summary = export_onnx(tiny_model("opt"), None, tmp_path / "onnx", exporter="torchscript")
    assert not (tmp_path / "onnx" / "genai_config.json").exists()
    assert "no 'opt' model type" in summary["onnxruntime_genai"]
    result = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "onnx"), "--prompt", "hi",
                                       "--runtime", "genai"])
    assert result.exit_code == 2 and "no genai_config.json" in result.output and "OPT" in result.output
