import importlib

import pytest
import torch

from faspx.adapters import adapter_for
from faspx.errors import FaspxError
from faspx.prune import prune
from tests.conftest import calib, tiny_model


@torch.no_grad()
def test_sparsity_zero_returns_the_same_logits(kind):
    dense, model = tiny_model(kind), tiny_model(kind)
    report = prune(model, calib(), 0.0, progress=False)
    ids = calib(2, 16, seed=5)
    assert torch.equal(model(ids).logits, dense(ids).logits)
    assert report.layers == []


@torch.no_grad()
def test_prune_shrinks_the_ffn_and_keeps_a_stock_model(kind):
    model = tiny_model(kind)
    adapter = adapter_for(model.config)
    width = getattr(model.config, adapter.ffn_width_key)
    report = prune(model, calib(), 0.3, progress=False)
    new_width = getattr(model.config, adapter.ffn_width_key)
    assert new_width == width - report.n_remove["ffn"] < width
    for layer in adapter.layers(model):
        assert layer.get_submodule(adapter.ffn_consumer).weight.shape[1] == new_width
    assert torch.isfinite(model(calib(2, 16, seed=5)).logits).all()
    assert len(report.layers) == model.config.num_hidden_layers
    for layer in report.layers:
        for result in layer.values():
            assert len(result.keep) == result.n_units - report.n_remove[next(k for k in layer if layer[k] is result)]


@torch.no_grad()
def test_restoration_beats_plain_removal_on_the_model_output(kind):
    ids = calib(16, 32)
    dense = tiny_model(kind)
    ref = dense(ids).logits
    errs = {}
    for restore_weights in (True, False):
        model = tiny_model(kind)
        prune(model, ids, 0.3, restore_weights=restore_weights, progress=False)
        errs[restore_weights] = float(((model(ids).logits - ref) ** 2).mean())
    assert errs[True] < errs[False]


@torch.no_grad()
def test_restored_layers_report_lower_error():
    model = tiny_model("opt")
    report = prune(model, calib(16, 32), 0.3, progress=False)
    for layer in report.layers:
        for result in layer.values():
            assert result.restored and result.err_restored < result.err_removed


@torch.no_grad()
def test_nan_in_a_layer_fails_naming_the_layer():
    model = tiny_model("llama")
    model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(FaspxError, match="layer 1"):
        prune(model, calib(), 0.2, progress=False)


@torch.no_grad()
def test_singular_gram_falls_back_to_more_damping(monkeypatch):
    """With damping 0 and rank-deficient inputs Cholesky fails; the retry with more damping succeeds."""
    model = tiny_model("opt")
    ids = torch.zeros(2, 8, dtype=torch.long)  # 16 tokens: G (192 x 192) at fc2 has rank <= 16
    report = prune(model, ids, 0.2, damp=0.0, progress=False)
    damps = [r.damp for layer in report.layers for r in layer.values()]
    assert any(d > 0 for d in damps)


def test_dtype_and_device_resolution():
    from faspx.errors import UsageError
    from faspx.prune import resolve_device, resolve_dtype

    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(UsageError):
        resolve_dtype("int3", torch.device("cpu"))
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(UsageError, match="no CUDA"):
            resolve_device("cuda")


@torch.no_grad()
def test_bf16_forward_prunes_an_fp32_model():
    model = tiny_model("qwen2")
    prune(model, calib(), 0.2, dtype="bfloat16", progress=False)
    assert next(model.parameters()).dtype == torch.float32
    assert torch.isfinite(model(calib(2, 16)).logits).all()


@torch.no_grad()
@pytest.mark.parametrize(
    "options", [{"selection": "obs"}, {"target": "dense"}, {"selection": "obs", "target": "dense"}]
)
def test_accuracy_options_run_and_reduce_the_output_error(options):
    ids = calib(16, 32)
    dense = tiny_model("llama")
    ref = dense(ids).logits
    errs = {}
    for name, opts in (("paper", {}), ("option", options)):
        model = tiny_model("llama")
        report = prune(model, ids, 0.3, progress=False, **opts)
        errs[name] = float(((model(ids).logits - ref) ** 2).mean())
        assert report.selection == opts.get("selection", "wanda") and report.target == opts.get("target", "pruned")
    assert errs["option"] < errs["paper"]


def test_unknown_selection_or_target_is_a_usage_error():
    from faspx.errors import UsageError

    with pytest.raises(UsageError, match="selection"):
        prune(tiny_model("opt"), calib(), 0.2, selection="magic", progress=False)
    with pytest.raises(UsageError, match="target"):
        prune(tiny_model("opt"), calib(), 0.2, target="magic", progress=False)


@torch.no_grad()
def test_auto_damping_is_recorded_per_matrix():
    from faspx.restore import DAMP_CANDIDATES

    model = tiny_model("opt")
    report = prune(model, calib(16, 32), 0.3, damp="auto", progress=False)
    damps = [r.damp for layer in report.layers for r in layer.values()]
    assert damps and all(d in DAMP_CANDIDATES for d in damps)
    with pytest.raises(Exception, match="damp"):
        prune(tiny_model("opt"), calib(), 0.2, damp="lots", progress=False)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_bias_aware_restoration_lowers_the_error_and_stays_stock(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = calib(16, 32)
    errs = {}
    for bias in (False, True):
        model = tiny_model(kind)
        report = prune(model, ids, 0.3, bias=bias, progress=False)
        errs[bias] = [r.err_restored for layer in report.layers for r in layer.values()]
        assert report.bias == bias
    # more freedom, same data: every restored layer error goes down (the first layer sees the same inputs)
    assert errs[True][0] < errs[False][0] and sum(errs[True]) < sum(errs[False])
    if kind == "llama":  # no native biases: the stock fields switch on, every governed module gets one
        assert model.config.mlp_bias and model.config.attention_bias
        assert model.model.layers[0].mlp.gate_proj.bias is not None
        model.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)  # sdpa vs eager


def test_bias_is_skipped_where_no_stock_field_exists():
    model = tiny_model("qwen2")  # Qwen2 has no o_proj / down_proj bias field
    prune(model, calib(), 0.3, bias=True, progress=False)
    assert model.model.layers[0].mlp.down_proj.bias is None
    assert not hasattr(model.config, "mlp_bias")


@torch.no_grad()
@pytest.mark.parametrize("dead", ["attn", "ffn"])
def test_structure_auto_puts_the_budget_where_removal_is_free(dead):
    """With units that carry nothing in one pair, removing them costs no error: auto must find that
    split (all attention units it may take when V rows are dead; all in the FFN when FFN channels are)."""
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    for layer in adapter.layers(model):
        if dead == "attn":
            layer.self_attn.v_proj.weight[:24] = 0  # half of the 48 V units (rows) read nothing
        else:
            layer.mlp.up_proj.weight[:80] = 0  # act(gate) * 0: half of the 160 FFN channels are dead
    report = prune(model, calib(16, 32), 0.2, structure="auto", progress=False)
    chosen = [s for s in report.splits if s["chosen"]]
    assert len(chosen) == 1 and chosen[0]["n_remove"] == report.n_remove
    assert chosen[0]["error"] == min(s["error"] for s in report.splits)
    attn_options = sorted(s["n_remove"]["attn"] for s in report.splits)
    if dead == "attn":
        assert report.n_remove["attn"] == attn_options[-1] == 24
    else:
        assert report.n_remove["attn"] == 0 and chosen[0]["error"] == pytest.approx(0.0, abs=1e-12)
    assert model.config.intermediate_size == 160 - report.n_remove["ffn"]


@torch.no_grad()
@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_structure_auto_is_no_worse_than_the_paper_or_mlp_on_held_out_tokens(kind):
    """On tiny OPT the paper's equal split wins, on tiny GQA LLaMA the FFN-only one: auto, which
    judges candidates on calibration samples, must land on the better one for held-out tokens too."""
    ids, held_out = calib(16, 32), calib(8, 32, seed=50)
    ref = tiny_model(kind)(held_out).logits
    errors, chosen = {}, None
    for structure in ("fasp", "mlp", "auto"):
        model = tiny_model(kind)
        report = prune(model, ids, 0.3, structure=structure, progress=False)
        errors[structure] = float(((model(held_out).logits - ref) ** 2).mean())
        chosen = report.n_remove
    assert errors["auto"] <= min(errors["fasp"], errors["mlp"]) * (1 + 1e-6)
    assert (chosen["attn"] > 0) == (kind == "opt")  # the two families really differ here


@torch.no_grad()
def test_a_restoration_that_raises_the_error_is_refused_unless_the_guard_is_off(monkeypatch):
    import importlib

    driver = importlib.import_module("faspx.prune")  # the module: faspx.prune is also the function
    real_restore = driver.restore
    monkeypatch.setattr(driver, "restore", lambda *a, **k: real_restore(*a, **k) * 3.0)  # a bad solve
    kept = {}
    for guard in (True, False):
        model = tiny_model("opt")
        report = prune(model, calib(16, 32), 0.3, guard=guard, progress=False)
        results = [r for layer in report.layers for r in layer.values()]
        assert all(r.err_restored > r.err_removed for r in results) and report.guard is guard
        assert all(r.restored is not guard for r in results)
        kept[guard] = model.model.decoder.layers[0].fc2.weight.clone()
    plain = tiny_model("opt")
    prune(plain, calib(16, 32), 0.3, restore_weights=False, progress=False)
    assert torch.equal(kept[True], plain.model.decoder.layers[0].fc2.weight)  # the guard kept plain removal
    assert not torch.equal(kept[False], kept[True])


@torch.no_grad()
def test_per_layer_widths_keep_the_budget_in_steps_of_256():
    model = tiny_model("llama-wide")
    adapter = adapter_for(model.config)
    uniform = prune(tiny_model("llama-wide"), calib(8, 32), 0.35, structure="mlp", progress=False)
    report = prune(model, calib(8, 32), 0.35, structure="mlp", ffn_widths="per-layer", progress=False)
    widths = adapter.ffn_widths(model)
    assert report.layer_widths == widths and len(set(widths)) > 1  # 3 x 381 channels: no uniform fit
    assert all(w % 256 == 0 for w in widths)
    # the uniform plan's total, to the nearest 256
    assert abs(sum(1024 - w for w in widths) - 3 * uniform.n_remove["ffn"]) <= 128
    assert [len(layer["ffn"].keep) for layer in report.layers] == widths
    assert report.removed_fraction == pytest.approx(sum(1024 - w for w in widths) * 3 * 64 / (3 * 208896))
    assert report.width_errors["removals"] == [0, 256, 512, 768]
    assert len(report.width_errors["errors"]) == 3 and all(row[0] == 0 for row in report.width_errors["errors"])
    assert torch.isfinite(model(calib(2, 16, seed=5)).logits).all()


@torch.no_grad()
def test_per_layer_widths_spare_the_layer_whose_ffn_matters_most():
    """Scale one layer's FFN output up: its error curve rises with it, so it keeps the widest FFN."""
    for loud in range(3):
        model = tiny_model("llama-wide")
        model.model.layers[loud].mlp.down_proj.weight.mul_(20)
        report = prune(model, calib(8, 32), 0.35, structure="mlp", ffn_widths="per-layer", progress=False)
        widths = report.layer_widths
        assert widths[loud] == max(widths) and widths.count(max(widths)) == 1, (loud, widths)


@pytest.mark.parametrize("kind, message", [("opt", "cannot take it"), ("qwen2", "cannot take it"),
                                           ("llama", "at least 512")])
def test_per_layer_widths_refuse_models_that_cannot_take_them(kind, message):
    from faspx.errors import UsageError

    with pytest.raises(UsageError, match=message):
        prune(tiny_model(kind), calib(), 0.2, ffn_widths="per-layer", progress=False)
    with pytest.raises(UsageError, match="not one of"):
        prune(tiny_model(kind), calib(), 0.2, ffn_widths="ragged", progress=False)


@torch.no_grad()
@pytest.mark.parametrize("structure", ["fasp", "mlp"])
def test_advancing_from_the_ffn_pass_equals_rerunning_the_layer(kind, structure, monkeypatch):
    """The next layer's inputs made from the FFN statistics pass are those of a rerun of the pruned layer."""
    driver = importlib.import_module("faspx.prune")
    stashed = []
    real = driver.advance_stashed
    monkeypatch.setattr(driver, "advance_stashed", lambda *a, **k: stashed.append(1) or real(*a, **k))
    fast, slow = tiny_model(kind), tiny_model(kind)
    fast_report = prune(fast, calib(), 0.3, structure=structure, progress=False)
    uses_stash = adapter_for(fast.config).ffn_residual_input(fast.config) is not None
    assert len(stashed) == (fast.config.num_hidden_layers if uses_stash else 0)
    monkeypatch.setattr(driver, "stash_fits", lambda *_: False)  # as when the inputs do not fit in memory
    slow_report = prune(slow, calib(), 0.3, structure=structure, progress=False)
    assert len(stashed) == (fast.config.num_hidden_layers if uses_stash else 0)
    assert [{p: r.keep for p, r in layer.items()} for layer in fast_report.layers] == \
        [{p: r.keep for p, r in layer.items()} for layer in slow_report.layers]
    ids = calib(2, 16, seed=5)
    torch.testing.assert_close(fast(ids).logits, slow(ids).logits, rtol=1e-5, atol=1e-5)


def test_gram_of_bfloat16_values_is_as_accurate_as_float32():
    """exact_bf16_products keeps float32 accuracy for bfloat16-valued operands and restores the setting."""
    driver = importlib.import_module("faspx.prune")
    x = torch.randn(512, 96, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    exact = x.double().T @ x.double()
    before = torch.backends.mkldnn.matmul.fp32_precision
    with driver.exact_bf16_products(torch.nn.Linear(96, 4)):  # a float32 consumer: left as it is
        assert torch.backends.mkldnn.matmul.fp32_precision == before
    with driver.exact_bf16_products(torch.nn.Linear(96, 4).bfloat16()):
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"  # the fast path is on
        gram = x.T @ x
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    assert float((gram.double() - exact).abs().max() / exact.abs().max()) < 2e-6


@torch.no_grad()
@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_the_best_one_shot_options_are_no_worse_than_the_paper_on_held_out_tokens(kind):
    """Issue 6: on OPT the best faspx method must not be worse than the paper's FASP. The one-shot part
    of it on a model not measured (structure auto, OBS selection, damping by measurement), on tokens
    that calibration did not see."""
    ids, held_out = calib(16, 32), calib(8, 32, seed=50)
    ref = tiny_model(kind)(held_out).logits
    errors = {}
    for name, options in (("paper", {}), ("best", {"structure": "auto", "selection": "obs", "damp": "auto"})):
        model = tiny_model(kind)
        prune(model, ids, 0.3, progress=False, **options)
        errors[name] = float(((model(held_out).logits - ref) ** 2).mean())
    # (measured: tiny OPT 4.94e-4 vs 4.96e-4, a near tie, the equal split winning there; tiny LLaMA 10x lower)
    assert errors["best"] <= errors["paper"]
