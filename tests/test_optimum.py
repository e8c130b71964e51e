"""Optimum's ORTModelForCausalLM (its own environment: `make optimum`) runs faspx's ONNX export on
transformers' greedy path."""

from __future__ import annotations

import pytest

from faspx.benchmarks.optimum_client import optimum_greedy, optimum_python
from faspx.exporters.onnx import export_onnx
from tests.conftest import assert_on_greedy_path, sharpened, tiny_model

pytestmark = pytest.mark.skipif(optimum_python() is None,
                                reason="no Optimum environment (make optimum, or FASPX_OPTIMUM_PYTHON)")
PROMPTS = [[1, 17, 200, 31], [1, 9, 40, 120, 5, 77]]
NEW_TOKENS = 12


# Optimum sizes the first (empty) past as hidden_size / heads: the tiny "llama" here, whose head_dim is
# 24 (not 64 / 4), is refused by onnxruntime in Optimum; real checkpoints keep the two equal.
@pytest.mark.parametrize("kind", ["mistral", "qwen2", "opt"])
def test_optimum_runs_the_export_on_transformers_greedy_path(kind, tmp_path):
    model = sharpened(tiny_model(kind))
    export_onnx(model, None, tmp_path / "onnx", exporter="torchscript")
    tokens = optimum_greedy(tmp_path / "onnx", PROMPTS, NEW_TOKENS)
    for prompt, new in zip(PROMPTS, tokens, strict=True):
        assert len(new) == NEW_TOKENS
        assert_on_greedy_path(model, prompt, new)
