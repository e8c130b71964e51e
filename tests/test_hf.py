"""The stock HF export: reload with plain transformers, exact logits, dtype, shards, disk and bad input."""

from __future__ import annotations

import copy
import functools
import json
import shutil
from collections import namedtuple

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import faspx
from faspx.errors import FaspxError, UsageError
from faspx.exporters import check_disk, export_hf, is_model_dir, require_model_dir
from faspx.outputs import FaspInfo, atomic_dir
from tests.conftest import VOCAB, calib, recipe, tiny_model

FFN_KEY = {"opt": "ffn_dim", "llama": "intermediate_size", "qwen2": "intermediate_size"}


@functools.cache
def pruned_tiny(kind: str, structure: str = "fasp") -> torch.nn.Module:
    """A tiny model pruned at 0.3 with random calibration ids: its FFN is physically narrower.

    Matrices are scaled x3 from HF's init so that greedy decoding depends on the context (with the
    init alone tiny OPT repeats one token). Cached: exports only read the model, so tests share it.
    """
    model = tiny_model(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed_positions" not in name:
                p.mul_(3)
    faspx.prune(model, calib(n=4, seqlen=16), 0.3, recipe("paper", structure=structure), progress=False)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(params=["opt", "llama", "qwen2"])
def pruned(request):
    return request.param, pruned_tiny(request.param)


def test_reloads_with_stock_class_and_same_logits(pruned, tmp_path):
    kind, model = pruned
    dense_width = getattr(tiny_model(kind).config, FFN_KEY[kind])
    info = FaspInfo(source_model="tiny", sparsity=0.3)
    summary = export_hf(model, None, tmp_path / "hf", info)
    out = tmp_path / "hf"
    assert {"model.safetensors", "config.json", "generation_config.json", "fasp.json"} <= set(summary["files"])
    assert summary["bytes"] == sum(p.stat().st_size for p in out.iterdir())
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["dtype"] == "float32"
    assert config[FFN_KEY[kind]] == getattr(model.config, FFN_KEY[kind]) < dense_width
    assert json.loads((out / "fasp.json").read_text()) == info.to_dict()

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert type(reloaded).__module__.startswith("transformers.models.")
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    reloaded.set_attn_implementation(model.config._attn_implementation)  # same kernels, same numbers
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    assert (logits(reloaded, ids) - logits(model, ids)).abs().max() < 1e-6


def test_tokenizer_files_are_written(opt_tokenizer, tmp_path):
    export_hf(pruned_tiny("llama"), opt_tokenizer, tmp_path / "hf", None)
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert "tokenizer_config.json" in names and ({"tokenizer.json"} & names or {"vocab.json"} & names)
    assert "fasp.json" not in names
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("hello world")["input_ids"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_saved_dtype_leaves_the_model_alone(dtype, tmp_path):
    model = pruned_tiny("opt")  # OPT ties lm_head to the embeddings: the tie must survive the cast
    config_dtype = model.config.dtype
    summary = export_hf(model, None, tmp_path / "hf", None, dtype=dtype)
    assert summary["dtype"] == dtype and model.dtype == torch.float32 and model.config.dtype == config_dtype
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    assert {str(t.dtype) for t in tensors.values()} == {f"torch.{dtype}"}
    assert "lm_head.weight" not in tensors  # tied: stored once
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == dtype
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model).to(getattr(torch, dtype)).float()  # the same rounding, in fp32
    assert (logits(reloaded, ids) - logits(reference, ids)).abs().max() < 1e-5


def test_bad_dtype_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="float8"):
        export_hf(tiny_model("llama"), None, tmp_path / "hf", None, dtype="float8")


def test_large_checkpoints_are_sharded(monkeypatch, tmp_path):
    import faspx.exporters.hf

    model = pruned_tiny("llama")
    monkeypatch.setattr(faspx.exporters.hf, "MAX_SHARD_SIZE", "40KB")
    summary = export_hf(model, None, tmp_path / "hf", None)
    shards = [n for n in summary["files"] if n.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in summary["files"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    assert (logits(reloaded, ids) - logits(model, ids)).abs().max() < 1e-6


def test_interrupted_export_leaves_nothing(monkeypatch, tmp_path):
    import faspx.outputs

    def boom(*_args, **_kwargs):
        raise RuntimeError("simulated crash while writing fasp.json")

    model = pruned_tiny("qwen2")
    monkeypatch.setattr(faspx.outputs, "write_json", boom)
    out = tmp_path / "export"
    with pytest.raises(RuntimeError, match="simulated"):
        with atomic_dir(out) as tmp:
            export_hf(model, None, tmp / "hf", FaspInfo(source_model="tiny", sparsity=0.3))
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary sibling


DiskUsage = namedtuple("DiskUsage", "total used free")


def test_not_enough_disk_names_the_size(monkeypatch, tmp_path):
    import faspx.exporters.hf

    model = pruned_tiny("llama")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: DiskUsage(10**12, 10**12 - 1000, 1000))
    needed = faspx.exporters.hf.estimate_bytes(model, torch.float32)
    with pytest.raises(FaspxError, match=rf"needs about {needed / 1e9:.2f} GB but only 0\.00 GB are free"):
        export_hf(model, None, tmp_path / "new" / "hf", None)
    assert not (tmp_path / "new").exists()  # checked before anything is written


def test_check_disk_measures_the_nearest_existing_parent(monkeypatch, tmp_path):
    seen = []

    def usage(path):
        seen.append(path)
        return DiskUsage(10**12, 0, 10**12)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    check_disk(tmp_path / "a" / "b" / "c", 10**9)
    assert seen == [tmp_path]
    with pytest.raises(FaspxError, match="2000.00 GB"):
        check_disk(tmp_path / "a", 2 * 10**12)


def test_model_directory_checks(tmp_path):
    assert not is_model_dir(tmp_path) and not is_model_dir(tmp_path / "missing")
    with pytest.raises(UsageError, match="no config.json"):
        require_model_dir(tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        require_model_dir(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    assert is_model_dir(tmp_path) and require_model_dir(tmp_path) == tmp_path
    with pytest.raises(UsageError, match="no model.onnx"):
        require_model_dir(tmp_path, need=("model.onnx",))


class CustomLlama(LlamaForCausalLM):
    """A class from outside transformers: its checkpoint would need custom code."""


def test_non_stock_class_is_refused(tmp_path):
    model = CustomLlama(tiny_model("llama").config)
    with pytest.raises(UsageError, match="not a stock transformers class"):
        export_hf(model, None, tmp_path / "hf", None)


@torch.no_grad()
def test_per_layer_widths_export_in_the_nemotron_nas_form(tmp_path):

    model = tiny_model("llama-wide")
    report = faspx.prune(model, calib(8, 32), 0.35, recipe("paper", structure="mlp", ffn_widths="per-layer"),
                         progress=False)
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert len(set(widths)) > 1 and report.form == "nemotron-nas"
    with pytest.raises(FaspxError, match="nemotron-nas form can hold them"):  # the form is never guessed
        export_hf(model, None, tmp_path / "guess", None)
    summary = export_hf(model, None, tmp_path / "hf", FaspInfo(source_model="tiny", form=report.form))
    out = tmp_path / "hf"
    assert summary["form"] == "nemotron-nas"
    assert {"configuration_decilm.py", "modeling_decilm.py", "model.safetensors"} <= set(summary["files"])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    blocks = config["block_configs"]
    # the exact widths (vLLM's nemotron_nas.py reads intermediate_size as is), and the GQA group size it reads
    assert [b["ffn"]["intermediate_size"] for b in blocks] == widths
    assert all(b["attention"]["n_heads_in_group"] == 2 and not b["attention"]["no_op"] for b in blocks)

    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)  # not stock, and says so
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert [layer.mlp.down_proj.in_features for layer in reloaded.model.layers] == widths
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    reloaded.set_attn_implementation(model.config._attn_implementation)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    assert (logits(reloaded, ids) - logits(model, ids)).abs().max() < 1e-6
    # a uniform model never gets the custom code
    assert export_hf(tiny_model("llama"), None, tmp_path / "stock")["form"] == "stock"
    assert not (tmp_path / "stock" / "modeling_decilm.py").exists()
