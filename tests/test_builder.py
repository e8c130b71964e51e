"""onnxruntime-genai's model builder as faspx's fast ONNX path (exporters/builder.py): what it takes,
that its graph matches PyTorch at batch 1 and decodes token for token in onnxruntime-genai, and that
what it cannot do is refused before any work."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

from faspx.cli import main
from faspx.errors import UsageError
from faspx.exporters.builder import builder_unsupported
from faspx.exporters.ort_runtime import OnnxDecoder

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")


def head32(vocab: int) -> LlamaConfig:
    """A tiny LLaMA-GQA whose head size (32) GroupQueryAttention takes on the CPU."""
    return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128)


@pytest.fixture
def model_dir(tmp_path, opt_tokenizer):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(head32(50272)).save_pretrained(tmp_path / "dense")
    opt_tokenizer.save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


def test_what_the_builder_takes():
    assert builder_unsupported(head32(512)) is None
    assert "not opt" in builder_unsupported(OPTConfig())
    assert "nemotron-nas" in builder_unsupported(head32(512), stock=False)
    narrow = head32(512)
    narrow.head_dim = 24
    assert "multiple of 16" in builder_unsupported(narrow)


def test_the_builder_export_matches_pytorch_and_genai_decodes_it_token_for_token(model_dir, tmp_path):
    import onnxruntime_genai as og

    # --exporter auto (the default) takes the builder where it can write the model
    result = CliRunner().invoke(main, ["export", "--model", str(model_dir), "--target", "onnx",
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "builder exporter" in result.output and "batch 1" in result.output  # validated against PyTorch
    onnx_dir = tmp_path / "o" / "onnx"
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph
    assert any(n.op_type == "GroupQueryAttention" for n in graph.node)
    assert json.loads((onnx_dir / "config.json").read_text())["faspx_exporter"] == "builder"
    prompt = np.random.default_rng(0).integers(0, 50272, size=(1, 10))
    ours = OnnxDecoder(onnx_dir, device="cpu").generate(prompt, max_new_tokens=6, eos_token_id=[])[0, 10:]
    model = og.Model(str(onnx_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=16, min_length=16)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    assert list(generator.get_sequence(0))[10:] == list(ours)  # one graph, one set of kernels
    # its fused attention takes no left padding: faspx's decoder says so instead of computing garbage
    with pytest.raises(UsageError, match="pad on the right"):
        OnnxDecoder(onnx_dir, device="cpu").prefill(np.ones((2, 4), dtype=np.int64), np.array([[0, 1, 1, 1]] * 2))


def test_a_builder_graph_scores_right_padded_rows_and_generates_a_left_padded_batch(model_dir, tmp_path,
                                                                                    opt_tokenizer):
    """Right padding is what its per-row lengths express (scoring, as faspx's lm-eval adapter pads);
    a left-padded batch is generated row by row, token for token with transformers' padded generate
    wherever PyTorch's top-2 margin is clear of float32 noise."""
    from faspx.exporters.builder import export_builder

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    export_builder(model, opt_tokenizer, tmp_path / "onnx")
    decoder = OnnxDecoder(tmp_path / "onnx", device="cpu")
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 50272, size=n) for n in (10, 6)]
    ids, mask = np.zeros((2, 10), dtype=np.int64), np.zeros((2, 10), dtype=np.int64)
    for b, row in enumerate(rows):
        ids[b, :len(row)], mask[b, :len(row)] = row, 1
    padded = decoder.prefill(ids, mask)[0]
    for b, row in enumerate(rows):
        alone = decoder.prefill(row[None])[0][0]
        assert np.abs(padded[b, :len(row)] - alone).max() <= 1e-4 * np.abs(alone).max()
    left_ids, left_mask = np.zeros_like(ids), np.zeros_like(mask)
    for b, row in enumerate(rows):
        left_ids[b, 10 - len(row):], left_mask[b, 10 - len(row):] = row, 1
    ours = decoder.generate(left_ids, left_mask, max_new_tokens=8, eos_token_id=[])[:, 10:]
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(left_ids), attention_mask=torch.from_numpy(left_mask), max_new_tokens=8,
                             do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = ref.sequences[:, 10:].numpy()
    top2 = torch.stack(ref.scores, 1).topk(2, dim=-1).values  # batch x step x 2
    clear = (top2[..., 0] - top2[..., 1] > 1e-3).numpy()
    for b in range(2):
        steps = int(np.argmin(clear[b])) if not clear[b].all() else 8  # up to the first near-tie
        assert steps >= 4 and (ours[b, :steps] == tokens[b, :steps]).all(), (b, steps, ours[b], tokens[b])


def test_what_the_builder_cannot_write_is_refused_before_any_work(tmp_path, opt_tokenizer, text_file):
    from tests.conftest import save_tiny

    runner = CliRunner()
    opt = save_tiny("opt", tmp_path / "opt", opt_tokenizer)
    bad = runner.invoke(main, ["export", "--model", str(opt), "--target", "onnx", "--exporter", "builder",
                               "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not opt" in bad.output and not (tmp_path / "x").exists(), bad.output
    llama = save_tiny("llama", tmp_path / "llama", opt_tokenizer)  # head size 24
    bad = runner.invoke(main, ["build", "--model", str(llama), "--sparsity", "0.3", "--calib", str(text_file),
                               "--nsamples", "4", "--seqlen", "64", "--exporter", "builder", "--out",
                               str(tmp_path / "y")])
    assert bad.exit_code == 2 and "multiple of 16" in bad.output and not (tmp_path / "y").exists(), bad.output


def test_int4_of_a_tied_builder_graph_quantizes_its_embedding_table_too(tmp_path, opt_tokenizer):
    from faspx.exporters.builder import export_builder
    from faspx.exporters.quantize import quantize_onnx

    config = head32(50272)  # the builder needs a tokenizer: the OPT one's ids
    config.tie_word_embeddings = True  # the builder stores the head's weight and transposes it for the lookup
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    export_builder(model, opt_tokenizer, tmp_path / "onnx")
    (tmp_path / "q").mkdir()
    summary = quantize_onnx(tmp_path / "onnx", tmp_path / "q", "int4")
    assert summary["untied"] and summary["nodes"]["GatherBlockQuantized"] == 1 and summary["float_matmuls_left"] == []
    graph = onnx.load(str(tmp_path / "q" / "model.onnx")).graph
    stored = sum(len(i.raw_data) if i.raw_data else onnx.numpy_helper.to_array(i).nbytes for i in graph.initializer)
    assert stored == summary["expected_bytes"]
