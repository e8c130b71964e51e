"""2SSP's structure: the balance (how many attention submodules, how many FFN channels), the removed
attention (exact, cache included), the perplexity search against a brute force, the FFN score from
the dense model, and the nemotron-nas and ONNX outputs of a model without some attention."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import faspx
from faspx.adapters import LLAMA, OPT
from faspx.budget import attention_removals, module_params, plan_2ssp
from faspx.depth import attention_layers, remove_attention, search_attention
from faspx.errors import UsageError
from faspx.outputs import FaspInfo
from faspx.recipes import get_recipe
from tests.conftest import VOCAB, calib, tiny_model


def layer_params(model) -> int:
    return sum(module_params(layer) for layer in model.model.layers)


@pytest.mark.parametrize("sparsity", [0.25, 0.375, 0.5])
def test_2ssp_removes_the_formulas_attention_count_and_reaches_the_fraction_within_a_channel(sparsity):
    model = tiny_model("llama-deep")
    before = layer_params(model)
    layer = model.model.layers[0]
    attn, ffn = module_params(layer.self_attn), module_params(layer.mlp)
    report = faspx.prune(model, calib(8, 32), sparsity, "2ssp", progress=False, device="cpu")
    expected = round(8 * sparsity ** ((ffn / attn) / 1.5))  # the paper's equation, SmolLM2's ratio of 3
    assert len(report.attention_removed) == expected == attention_removals(8, sparsity, ffn, attn)
    assert attention_layers(model, LLAMA).count(False) == expected
    removed = before - layer_params(model)  # counted on the model, norms included, as the paper counts
    channel = 3 * model.config.hidden_size
    assert abs(removed - sparsity * before) <= 8 * channel
    assert report.form == ("nemotron-nas" if expected else "stock")
    assert len({layer.mlp.down_proj.in_features for layer in model.model.layers}) == 1


def test_2ssp_balance_of_smollm2_135m_is_the_papers():
    # SmolLM2-135M: 30 layers, attention 884736 and FFN 2654208 parameters (3x): 2 of 30 at 25 %
    assert [attention_removals(30, s, 2654208, 884736) for s in (0.25, 0.375, 0.5)] == [2, 4, 8]


def test_2ssp_refuses_opt_before_any_weight_is_read():
    model = tiny_model("opt")
    with pytest.raises(UsageError, match="nemotron-nas.*LLaMA's layer.*'opt'"):
        plan_2ssp(model, OPT, 0.25)


def test_recipe_fields_of_the_depth_search_are_checked():
    with pytest.raises(UsageError, match="depth_samples"):
        get_recipe("2ssp", depth_samples=0)
    with pytest.raises(UsageError, match="alpha"):
        get_recipe("2ssp", alpha=0)
    assert not get_recipe("2ssp").stock and not get_recipe("2ssp").sequential


def test_a_removed_attention_is_exact_and_decoding_with_its_cache_matches_full_forwards():
    model = tiny_model("llama-deep")
    for i in (0, 3):  # layer 0 too: transformers reads the cache length from layer 0's entry
        remove_attention(model.model.layers[i], LLAMA, i)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    # token for token: every generated token is the argmax of a full forward over the tokens before it
    for step in range(6):
        prefix = out[:, :ids.shape[1] + step]
        assert torch.equal(model(prefix).logits[:, -1].argmax(-1), out[:, ids.shape[1] + step])
    # the layer's output is its input plus its FFN's output: nothing from attention
    layer = model.model.layers[3]
    h = torch.randn(1, 5, 64)
    kwargs = {"position_embeddings": model.model.rotary_emb(h, torch.arange(5)[None])}
    want = h + layer.mlp(layer.post_attention_layernorm(h))
    assert torch.allclose(layer(h, **kwargs), want, atol=1e-6)


def brute_force_ppl(model, samples, removed) -> float:
    trial = copy.deepcopy(model)
    for i in removed:
        remove_attention(trial.model.layers[i], LLAMA, i)
    with torch.no_grad():
        nll = sum(float(F.cross_entropy(trial(s[None]).logits[0, :-1], s[1:], reduction="sum")) for s in samples)
    return math.exp(nll / (samples.shape[0] * (samples.shape[1] - 1)))


def test_the_attention_search_is_greedy_by_perplexity_as_a_brute_force_computes_it():
    model = tiny_model("llama-deep", seed=3)
    dense = copy.deepcopy(model)
    samples = calib(2, 24, seed=5)
    removed, steps = search_attention(model, LLAMA, samples, 2, torch.device("cpu"), torch.float32, progress=False)
    chosen: list[int] = []
    for step in steps:
        brute = {i: brute_force_ppl(dense, samples, [*chosen, i]) for i in range(8) if i not in chosen}
        assert set(step["candidates"]) == set(brute)
        for i, ppl in brute.items():  # the prefix-cached walk scores each candidate as the whole model does
            assert step["candidates"][i] == pytest.approx(ppl, rel=1e-4)
        gap = sorted(brute.values())
        assert gap[1] - gap[0] > 1e-3 * gap[0]  # a real margin, not a near-tie
        assert step["removed"] == min(brute, key=brute.get)
        chosen.append(step["removed"])
    assert removed == chosen and attention_layers(model, LLAMA).count(False) == 2


def test_2ssp_scores_ffn_neurons_on_the_dense_model_by_mean_l2_norm():
    model = tiny_model("llama-deep", seed=1)
    samples = calib(4, 16, seed=2)
    # the oracle: act(gate) * up of every layer in one forward of the dense model, per sample
    norms = [torch.zeros(192, dtype=torch.float64) for _ in range(8)]

    def grab(i):
        def hook(_module, args):
            norms[i].add_(args[0][0].double().norm(dim=0) / len(samples))  # returns None: input unchanged
        return hook

    hooks = [layer.mlp.down_proj.register_forward_pre_hook(grab(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for s in samples:
            model(s[None])
    for h in hooks:
        h.remove()
    report = faspx.prune(model, samples, 0.25, "2ssp", progress=False, device="cpu")
    n_keep = model.config.intermediate_size
    for i, layer in enumerate(report.layers):
        want = torch.topk(norms[i], n_keep).indices.sort().values.tolist()
        assert layer["ffn"].keep == want, i
        assert layer["ffn"].err_removed is None  # no Gram gathered: 2SSP needs none


def test_2ssp_quality_restores_the_ffn_of_the_model_without_the_removed_attention():
    model = tiny_model("llama-deep", seed=1)
    report = faspx.prune(model, calib(8, 32), 0.5, get_recipe("2ssp-quality", distill=0, depth_samples=2),
                         progress=False, device="cpu")
    assert len(report.attention_removed) == 2 and report.depth_search[0]["candidates"]
    assert all(layer["ffn"].err_restored is not None for layer in report.layers)


@pytest.fixture
def pruned_deep():
    model = tiny_model("llama-deep", seed=1)
    report = faspx.prune(model, calib(8, 32), 0.5, "2ssp", progress=False, device="cpu")
    return model, report


def test_the_nemotron_nas_export_marks_removed_attention_and_reloads_to_the_same_logits(tmp_path, pruned_deep,
                                                                                     opt_tokenizer):
    from faspx.exporters.hf import export_hf, load_nas

    model, report = pruned_deep
    export_hf(model, opt_tokenizer, tmp_path / "hf", FaspInfo(source_model="tiny", form=report.form))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    blocks = config["block_configs"]
    assert [i for i, b in enumerate(blocks) if b["attention"]["no_op"]] == sorted(report.attention_removed)
    assert all(b["ffn"]["intermediate_size"] == model.config.intermediate_size for b in blocks)  # exact
    reloaded, _ = load_nas(tmp_path / "hf")
    reloaded.set_attn_implementation(model.config._attn_implementation)
    assert attention_layers(reloaded, LLAMA) == attention_layers(model, LLAMA)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (reloaded(ids).logits - model(ids).logits).abs().max() < 1e-6  # same weights, same graph


def test_the_onnx_export_drops_the_removed_layers_kv_and_matches_pytorch(tmp_path, pruned_deep):
    import onnx

    from faspx.exporters.onnx import export_onnx, validate_onnx

    model, report = pruned_deep
    export_onnx(model, None, tmp_path / "onnx", FaspInfo(source_model="tiny", form=report.form),
                exporter="torchscript")
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    past = [i.name for i in graph.input if i.name.startswith("past_key_values.")]
    present = [o.name for o in graph.output if o.name.startswith("present.")]
    assert len(past) == len(present) == 2 * (8 - len(report.attention_removed))
    config = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert config["faspx_kv_layers"] == [i for i in range(8) if i not in report.attention_removed]
    genai = json.loads((tmp_path / "onnx" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == 8 - len(report.attention_removed)
    result = validate_onnx(tmp_path / "onnx", model)  # raises beyond the bound
    assert result["prefill_max_abs_diff"] <= result["bound"] and result["present_max_abs_diff"] < 1e-4
