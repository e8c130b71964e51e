"""int4/int8 ONNX graphs (exporters/quantize.py): the quantized ops are in the graph, the bytes are
what the block layout gives, the graph runs in onnxruntime (and onnxruntime-genai) with logits close
to the float32 graph's, greedy tokens agree wherever the float32 margin exceeds the measured logit
error, and the check refuses a broken quantization."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

from faspx.cli import main
from faspx.errors import FaspxError, UsageError
from faspx.exporters.files import weight_file_bytes
from faspx.exporters.onnx import export_onnx
from faspx.exporters.ort_runtime import OnnxDecoder
from faspx.exporters.quantize import (
    check_quantize,
    expected_weight_bytes,
    quantize_onnx,
    untie_transposed_weights,
    validate_quantized,
)
from faspx.outputs import FaspInfo

# Wide enough that weights, not the graph's own bytes, make the file (the size factor is then the weights').
WIDE = {
    "llama": lambda: LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=128),
    "opt": lambda: OPTConfig(hidden_size=256, ffn_dim=512, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
                             max_position_embeddings=128, word_embed_proj_dim=256),
}
LINEARS = {"llama": 7, "opt": 6}  # per layer; + the LM head


SUCCESSOR = np.random.default_rng(0).permutation(512)  # the bigram the tiny models learn


def chains(starts: np.ndarray, length: int) -> np.ndarray:
    """Token sequences that follow SUCCESSOR from ``starts``."""
    rows = [starts]
    for _ in range(length - 1):
        rows.append(SUCCESSOR[rows[-1]])
    return np.stack(rows, 1)


def trained(config) -> torch.nn.Module:
    """A tiny model taught SUCCESSOR for 60 steps: confident predictions, so real margins to test on
    (a random one's top logits are near ties that any quantization swaps)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(1)
    for _ in range(60):
        ids = torch.from_numpy(chains(rng.integers(0, 512, 16), 24))
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "opt"])
def exported(request, tmp_path_factory):
    model = trained(WIDE[request.param]())
    out = tmp_path_factory.mktemp(request.param) / "onnx"
    export_onnx(model, None, out, FaspInfo(source_model="tiny"), exporter="torchscript")
    return request.param, model, out


def initializer_bytes(path) -> int:
    graph = onnx.load(str(path)).graph
    return sum(len(i.raw_data) if i.raw_data else onnx.numpy_helper.to_array(i).nbytes for i in graph.initializer)


@pytest.mark.parametrize("precision, bits, layout", [("int4", 4, "uniform"), ("int4", 4, "mixed"),
                                                     ("int4", 4, "half"), ("int8", 8, "mixed")])
def test_a_quantized_graph_holds_matmulnbits_and_the_bytes_its_blocks_give(exported, tmp_path, precision, bits,
                                                                          layout):
    family, model, src = exported
    summary = quantize_onnx(src, tmp_path, precision, layout=layout)
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == LINEARS[family] * 2 + 1  # every linear and the LM head
    widths = [a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"]
    # int4 mixed: the LM head, q, k, v and the FFN output of both layers at 8 bits; half: those of the
    # layers in the first and last eighth and every third between (Q4_K_M's rule): of two, layer 0 only
    eight = 0 if bits == 8 or layout == "uniform" else 1 + 4 * {"mixed": 2, "half": 1}[layout]
    assert widths.count(8) == (len(widths) if bits == 8 else eight) and summary["eight_bit_matmuls"] == eight
    assert ops.count("GatherBlockQuantized") == (0 if bits == 8 else 1 + (family == "opt"))  # OPT: positions too
    assert summary["float_matmuls_left"] == []
    # the weights are exactly what the block layout gives, and the file follows them within 10 %
    assert initializer_bytes(tmp_path / "model.onnx") == summary["expected_bytes"]
    overhead = weight_file_bytes(src) - initializer_bytes(src / "model.onnx")
    factor = (summary["expected_bytes"] + overhead) / weight_file_bytes(src)
    assert summary["bytes"] / weight_file_bytes(src) == pytest.approx(factor, rel=0.10)
    assert factor < (0.2 if layout == "uniform" else 0.3 if bits == 4 else 0.4)  # int8: float32 embedding table
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["faspx_quantization"]["precision"] == precision and (tmp_path / "fasp.json").exists()


@pytest.mark.parametrize("precision, tolerance", [("int8", 0.03), ("int4", 0.3)])
def test_a_quantized_graph_runs_close_to_float32_and_agrees_wherever_the_margin_is_real(exported, tmp_path,
                                                                                      precision, tolerance):
    _, _, src = exported
    quantize_onnx(src, tmp_path, precision)
    ids = chains(np.random.default_rng(2).integers(0, 512, 4), 24)  # prompts the models learned to continue
    reference, _ = OnnxDecoder(src, device="cpu").prefill(ids)
    logits, _ = OnnxDecoder(tmp_path, device="cpu").prefill(ids)
    assert np.sqrt(((logits - reference) ** 2).mean() / (reference ** 2).mean()) < tolerance  # rms, relative
    error = np.abs(logits - reference).max(-1)  # per position, over the vocabulary
    top2 = np.sort(reference, -1)[..., -2:]
    real = (top2[..., 1] - top2[..., 0]) > 2 * error  # no logit moved enough to swap these two
    assert real.mean() > 0.5, f"only {real.sum()} positions with a margin above the error: the test would be vacuous"
    assert (logits.argmax(-1) == reference.argmax(-1))[real].all()
    # greedy decoding from a learned prompt: the same tokens, which the margins above allow
    prompt = ids[:, :8]
    ours = OnnxDecoder(tmp_path, device="cpu").generate(prompt, max_new_tokens=8, eos_token_id=[])
    assert (ours == OnnxDecoder(src, device="cpu").generate(prompt, max_new_tokens=8, eos_token_id=[])).all()


def test_a_tied_embedding_is_untied_so_the_lm_head_is_quantized_too(tmp_path):
    config = WIDE["llama"]()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    export_onnx(model, None, tmp_path / "onnx", FaspInfo(source_model="tiny"), exporter="dynamo")
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    assert untie_transposed_weights(graph) == ["model.lm_head.weight"]  # one table: lookup and transposed head
    (tmp_path / "q").mkdir()
    summary = quantize_onnx(tmp_path / "onnx", tmp_path / "q", "int4")
    assert summary["untied"] == ["model.lm_head.weight"] and summary["nodes"]["MatMulNBits"] == 15
    assert summary["eight_bit_matmuls"] == 1 + 4 * 2  # dynamo names no node: its module scopes tell q/k/v, down
    assert summary["nodes"]["GatherBlockQuantized"] == 1 and summary["float_matmuls_left"] == []


def test_expected_bytes_of_one_matmul_weight():
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.zeros((100, 8), dtype=np.float32), "w")  # K = 100: 4 blocks of 32
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    model = helper.make_model(helper.make_graph([node], "g", [], [], [weight]))
    assert expected_weight_bytes(model, 4, 32, True) == 8 * 4 * (16 + 4)
    assert expected_weight_bytes(model, 8, 32, True) == 8 * 4 * (32 + 4)


def test_the_check_refuses_a_quantization_beyond_its_bound(exported, tmp_path):
    _, _, src = exported
    quantize_onnx(src, tmp_path, "int4")
    ids = torch.randint(0, 512, (1, 256), generator=torch.Generator().manual_seed(0))
    result = validate_quantized(tmp_path, src, ids, 64, windows=2, prompts=2, prompt_len=8, new_tokens=4)
    assert result["ppl_ratio"] == pytest.approx(result["ppl_int4"] / result["ppl_float32"])
    assert 0 <= result["greedy"]["prefix_equal"] <= result["greedy"]["tokens_equal"] <= 1
    with pytest.raises(FaspxError, match="above the bound"):
        validate_quantized(tmp_path, src, ids, 64, windows=2, prompts=2, prompt_len=8, new_tokens=4,
                           bound=result["ppl_ratio"] * 0.99)


def test_bad_quantization_settings_are_refused():
    for args, message in ((("int3",), "--quantize"), (("int4", 48), "--block-size"), (("int4", 32, 5), "0..4")):
        with pytest.raises(UsageError, match=message):
            check_quantize(*args)


def test_genai_runs_the_int4_graph_token_for_token_with_onnxruntime(tmp_path):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    model = trained(WIDE["llama"]())
    export_onnx(model, None, tmp_path / "onnx", FaspInfo(source_model="tiny"), exporter="torchscript")
    (tmp_path / "q").mkdir()
    quantize_onnx(tmp_path / "onnx", tmp_path / "q", "int4")
    prompt = chains(np.array([7]), 12)
    ours = OnnxDecoder(tmp_path / "q", device="cpu").generate(prompt, max_new_tokens=8, eos_token_id=[])[0, 12:]
    params = og.GeneratorParams(og.Model(str(tmp_path / "q")))
    params.set_search_options(do_sample=False, max_length=20, min_length=20)
    generator = og.Generator(og.Model(str(tmp_path / "q")), params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    assert list(generator.get_sequence(0))[12:] == list(ours)  # the same graph and kernels: the same tokens


def test_export_writes_a_checked_int4_copy_and_refuses_bad_input_first(tmp_path, text_file, opt_tokenizer):
    from tests.conftest import save_tiny

    dense = save_tiny("llama", tmp_path / "dense", opt_tokenizer)
    runner = CliRunner()
    bad = runner.invoke(main, ["export", "--model", str(dense), "--target", "hf", "--quantize", "int4",
                               "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--target onnx" in bad.output and not (tmp_path / "x").exists()
    bad = runner.invoke(main, ["export", "--model", str(dense), "--target", "onnx", "--quantize", "int4",
                               "--block-size", "48", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--block-size" in bad.output and not (tmp_path / "x").exists()
    bad = runner.invoke(main, ["export", "--model", str(dense), "--target", "onnx", "--quantize", "int4,int4",
                               "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "twice" in bad.output and not (tmp_path / "x").exists()
    result = runner.invoke(main, ["export", "--model", str(dense), "--target", "onnx", "--quantize", "int8,int4",
                                  "--quantize-eval", str(text_file), "--exporter", "torchscript",
                                  "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "onnx-int4/" in result.output and "onnx-int8/" in result.output and "greedy tokens equal" in result.output
    assert (tmp_path / "o" / "onnx" / "model.onnx").exists()
    for precision in ("int8", "int4"):
        assert (tmp_path / "o" / f"onnx-{precision}" / "model.onnx").exists()
        record = json.loads((tmp_path / "o" / f"onnx-{precision}" / "quantization.json").read_text())
        assert record["quantization"]["precision"] == precision and record["check"]["windows"] >= 1
