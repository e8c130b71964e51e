"""The ONNX export: Optimum's signature, ONNX vs PyTorch with and without KV cache, greedy decoding, size."""

from __future__ import annotations

import copy
import json
import shutil
from collections import namedtuple

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoConfig

import faspx.exporters.onnx
from faspx.errors import FaspxError, UsageError
from faspx.exporters import OnnxDecoder, export_onnx, validate_onnx
from faspx.exporters.ort_runtime import positions, select_providers
from faspx.outputs import FaspInfo, atomic_dir
from tests.conftest import TINY_CONFIGS, VOCAB, tiny_model
from tests.test_hf import FFN_KEY, pruned_tiny

KINDS = ["opt", "llama", "qwen2"]
KV = {"opt": (4, 16), "llama": (2, 24), "qwen2": (2, 16)}  # (kv heads, head dim) of the tiny configs


@pytest.fixture(scope="module", params=KINDS)
def exported(request, tmp_path_factory):
    """A pruned tiny model (sdpa attention, as loaded models run) and its dynamo ONNX export.

    The Qwen2 export puts its weights in model.onnx_data, so that layout is covered too.
    """
    kind = request.param
    model = copy.deepcopy(pruned_tiny(kind))
    model.set_attn_implementation("sdpa")
    out = tmp_path_factory.mktemp(f"onnx-{kind}")
    summary = export_onnx(model, None, out, FaspInfo(source_model="tiny", sparsity=0.3), exporter="dynamo",
                          external_data=kind == "qwen2")
    return kind, model, out, summary


def torch_logits(model, ids, mask):
    pos = torch.from_numpy(positions(mask.numpy(), ids.shape[1]))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()


def padded_batch(length: int = 9, seed: int = 5):
    """Batch 3, left padding of 0, 3 and 5 positions."""
    ids = torch.randint(3, VOCAB, (3, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 1
    return ids, mask


def test_graph_follows_optimum_conventions(exported):
    kind, model, out, summary = exported
    assert summary["exporter"] == "dynamo" and summary["external_data"] == (kind == "qwen2")
    assert (out / "model.onnx_data").exists() == (kind == "qwen2")
    assert {"model.onnx", "config.json", "generation_config.json", "fasp.json"} <= set(summary["files"])
    assert model.config._attn_implementation == "sdpa"  # export switched to eager and back
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["architectures"] == [type(model).__name__]
    assert AutoConfig.from_pretrained(out).to_dict()[FFN_KEY[kind]] == getattr(model.config, FFN_KEY[kind])
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    layers = model.config.num_hidden_layers
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "position_ids", *past]
    assert [o.name for o in graph.output] == ["logits", *present]

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    values = {v.name: v for v in [*graph.input, *graph.output]}
    heads, head_dim = KV[kind]
    assert dims(values["input_ids"]) == ["batch_size", "sequence_length"]
    assert dims(values["attention_mask"]) == ["batch_size", "past_sequence_length + sequence_length"]
    assert dims(values["past_key_values.0.key"]) == ["batch_size", heads, "past_sequence_length", head_dim]
    assert dims(values["present.1.value"]) == ["batch_size", heads, "past_sequence_length + sequence_length",
                                               head_dim]
    assert dims(values["logits"]) == ["batch_size", "sequence_length", VOCAB]


def test_validation_bounds_prefill_and_decode(exported):
    _, model, out, _ = exported
    result = validate_onnx(out, model)
    assert result["atol"] == faspx.exporters.onnx.ATOL_FP32 and result["batch"] == 3 and result["max_past_length"] > 0
    # the bound scales with the logits' magnitude, never below atol itself
    assert result["logit_scale"] >= 1 and result["bound"] == result["atol"] * result["logit_scale"]
    for key in ("prefill_max_abs_diff", "decode_max_abs_diff", "present_max_abs_diff"):
        assert 0 <= result[key] < 1e-4, (key, result)


def test_prefill_from_empty_past_and_chunks_on_past(exported):
    """Zero-length past tensors, then a 3-token chunk and a 1-token step on the graph's own cache."""
    _, model, out, _ = exported
    dec = OnnxDecoder(out, device="cpu")
    ids, mask = padded_batch(length=12)
    full = torch_logits(model, ids, mask)  # one pass, no cache
    keep = mask.bool().numpy()
    logits, past = dec.prefill(ids[:, :8].numpy(), mask[:, :8].numpy())
    assert [p.shape()[2] for p in past] == [8] * len(dec.past_names)
    assert np.abs(logits - full[:, :8])[keep[:, :8]].max() < 1e-4
    logits, past = dec.decode_step(ids[:, 8:11].numpy(), mask[:, :11].numpy(), past)
    assert np.abs(logits - full[:, 8:11]).max() < 1e-4
    logits, past = dec.decode_step(ids[:, 11:].numpy(), mask.numpy(), past)
    assert np.abs(logits - full[:, 11:]).max() < 1e-4
    assert past[0].shape()[2] == 12


def test_greedy_decoding_matches_generate(exported):
    _, model, out, _ = exported
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=1)
    got = OnnxDecoder(out, device="cpu").generate(ids.numpy(), mask.numpy(), max_new_tokens=20, pad_token_id=1)
    assert got.shape == tuple(expected.shape)
    np.testing.assert_array_equal(got, expected.numpy())


def test_validation_fails_beyond_the_bound(exported):
    kind, _, out, _ = exported
    other = tiny_model(kind, seed=7)  # different weights: the graph does not match it
    with pytest.raises(FaspxError, match="does not match PyTorch"):
        validate_onnx(out, other)


def onnx_bytes(directory) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.name.startswith("model.onnx"))


def test_pruned_graph_is_smaller_by_the_removed_weights(tmp_path):
    """structure=mlp at 0.3: the ONNX file shrinks by exactly the removed FFN weights (fp32 bytes)."""
    dense = tiny_model("llama")
    pruned = pruned_tiny("llama", "mlp")
    export_onnx(dense, None, tmp_path / "dense", exporter="torchscript")
    summary = export_onnx(pruned, None, tmp_path / "pruned", exporter="torchscript")
    assert summary["exporter"] == "torchscript"
    validate_onnx(tmp_path / "pruned", pruned)

    layers = dense.model.layers
    decoder_linear = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    removed_units = dense.config.intermediate_size - pruned.config.intermediate_size
    # gate and up lose rows, down loses columns: 3 x hidden weights per FFN channel, in every layer
    removed = len(layers) * removed_units * 3 * dense.config.hidden_size
    assert removed == sum(p.numel() for p in dense.parameters()) - sum(p.numel() for p in pruned.parameters())
    assert removed / decoder_linear == pytest.approx(0.3, abs=0.01)

    saved = onnx_bytes(tmp_path / "dense") - onnx_bytes(tmp_path / "pruned")
    # Embeddings, lm_head and the graph's structure are the same in both files: only FFN weights differ.
    assert saved == pytest.approx(4 * removed, rel=0.01)
    assert saved / (4 * decoder_linear) == pytest.approx(0.3, abs=0.01)
    embed_bytes = 4 * (dense.model.embed_tokens.weight.numel() + dense.lm_head.weight.numel())
    assert onnx_bytes(tmp_path / "pruned") > embed_bytes + 4 * (decoder_linear - removed)


def test_auto_falls_back_to_torchscript(monkeypatch, tmp_path):
    def broken(*_args, **_kwargs):
        raise RuntimeError("simulated torch.export failure")

    model = pruned_tiny("llama")
    monkeypatch.setattr(faspx.exporters.onnx, "_export_dynamo", broken)
    with pytest.raises(FaspxError, match="simulated torch.export failure"):
        export_onnx(model, None, tmp_path / "strict", exporter="dynamo")
    summary = export_onnx(model, None, tmp_path / "auto")
    assert summary["exporter"] == "torchscript"
    assert validate_onnx(tmp_path / "auto", model)["decode_max_abs_diff"] < 1e-4


def test_fp16_graph(tmp_path):
    model = pruned_tiny("llama")
    summary = export_onnx(model, None, tmp_path / "fp16", fp16=True, exporter="torchscript")
    assert summary["dtype"] == "float16" and model.dtype == torch.float32
    dec = OnnxDecoder(tmp_path / "fp16", device="cpu")
    assert dec.kv_dtype == np.float16
    result = validate_onnx(tmp_path / "fp16", model)
    assert result["atol"] == faspx.exporters.onnx.ATOL_FP16 and result["prefill_max_abs_diff"] < 1e-2


def test_interrupted_export_leaves_nothing(monkeypatch, tmp_path):
    import faspx.exporters.files

    def boom(*_args, **_kwargs):
        raise RuntimeError("simulated crash after model.onnx")

    monkeypatch.setattr(faspx.exporters.files, "write_json", boom)
    out = tmp_path / "export"
    with pytest.raises(RuntimeError, match="simulated"):
        with atomic_dir(out) as tmp:
            export_onnx(pruned_tiny("llama"), None, tmp / "onnx", FaspInfo(source_model="tiny", sparsity=0.3),
                        exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk(monkeypatch, tmp_path):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**12, 10**12, 0))
    with pytest.raises(FaspxError, match=r"needs about \d+\.\d\d GB but only 0\.00 GB are free"):
        export_onnx(pruned_tiny("llama"), None, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_bad_input(tmp_path):
    with pytest.raises(UsageError, match="exporter"):
        export_onnx(pruned_tiny("llama"), None, tmp_path / "x", exporter="jit")
    with pytest.raises(UsageError, match="no config.json"):
        OnnxDecoder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="no model.onnx"):
        OnnxDecoder(tmp_path)
    with pytest.raises(UsageError, match="device"):
        select_providers("tpu")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(UsageError, match="CUDAExecutionProvider"):
            select_providers("cuda")


def test_sliding_window_beyond_the_window(tmp_path):
    """Mistral with a 5-token window: the graph keeps every position and masks, PyTorch drops old ones."""
    from transformers import AutoModelForCausalLM

    config = TINY_CONFIGS["mistral"]()
    config.sliding_window = 5
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    export_onnx(model, None, tmp_path / "onnx", exporter="torchscript")
    result = validate_onnx(tmp_path / "onnx", model, length=8, decode_steps=3)
    assert max(result["prefill_max_abs_diff"], result["decode_max_abs_diff"]) < 1e-4
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=1)
    got = OnnxDecoder(tmp_path / "onnx", device="cpu").generate(ids.numpy(), mask.numpy(), max_new_tokens=20,
                                                                 pad_token_id=1)
    np.testing.assert_array_equal(got, expected.numpy())
