import copy
import importlib

import pytest
import torch

from faspx.adapters import adapter_for
from faspx.errors import FaspxError
from faspx.prune import prune
from tests.conftest import calib, recipe, tiny_model


@torch.no_grad()
def test_sparsity_zero_returns_the_same_logits(kind):
    dense, model = tiny_model(kind), tiny_model(kind)
    report = prune(model, calib(), 0.0, recipe("paper"), progress=False)
    ids = calib(2, 16, seed=5)
    assert torch.equal(model(ids).logits, dense(ids).logits)
    assert report.layers == []


@torch.no_grad()
def test_prune_shrinks_the_ffn_and_keeps_a_stock_model(kind):
    model = tiny_model(kind)
    adapter = adapter_for(model.config)
    width = getattr(model.config, adapter.ffn_width_key)
    report = prune(model, calib(), 0.3, recipe("paper"), progress=False)
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
        prune(model, ids, 0.3, recipe("paper", restore=restore_weights), progress=False)
        errs[restore_weights] = float(((model(ids).logits - ref) ** 2).mean())
    assert errs[True] < errs[False]


@torch.no_grad()
def test_restored_layers_report_lower_error():
    model = tiny_model("opt")
    report = prune(model, calib(16, 32), 0.3, recipe("paper"), progress=False)
    for layer in report.layers:
        for result in layer.values():
            assert result.restored and result.err_restored < result.err_removed


@torch.no_grad()
def test_nan_in_a_layer_fails_naming_the_layer():
    model = tiny_model("llama")
    model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(FaspxError, match="layer 1"):
        prune(model, calib(), 0.2, recipe("paper"), progress=False)


@torch.no_grad()
def test_singular_gram_falls_back_to_more_damping(monkeypatch):
    """With damping 0 and rank-deficient inputs Cholesky fails; the retry with more damping succeeds."""
    model = tiny_model("opt")
    ids = torch.zeros(2, 8, dtype=torch.long)  # 16 tokens: G (192 x 192) at fc2 has rank <= 16
    report = prune(model, ids, 0.2, recipe("paper", damp=0.0), progress=False)
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
    prune(model, calib(), 0.2, recipe("paper"), dtype="bfloat16", progress=False)
    assert next(model.parameters()).dtype == torch.float32
    assert torch.isfinite(model(calib(2, 16)).logits).all()


@torch.no_grad()
@pytest.mark.parametrize("options", [{"selection": "obs"}, {"structure": "mlp"},
                                     {"structure": "mlp", "selection": "obs", "damp": "auto"}])
def test_accuracy_options_run_and_reduce_the_output_error(options):
    ids = calib(16, 32)
    dense = tiny_model("llama")
    ref = dense(ids).logits
    errs = {}
    for name, opts in (("paper", {}), ("option", options)):
        model = tiny_model("llama")
        report = prune(model, ids, 0.3, recipe("paper", **opts), progress=False)
        errs[name] = float(((model(ids).logits - ref) ** 2).mean())
        assert report.recipe["selection"] == opts.get("selection", "wanda")
    assert errs["option"] < errs["paper"]


def test_unknown_selection_is_a_usage_error():
    from faspx.errors import UsageError

    with pytest.raises(UsageError, match="selection"):
        prune(tiny_model("opt"), calib(), 0.2, recipe("paper", selection="magic"), progress=False)


@torch.no_grad()
def test_auto_damping_is_recorded_per_matrix():
    from faspx.restore import DAMP_CANDIDATES

    model = tiny_model("opt")
    report = prune(model, calib(16, 32), 0.3, recipe("paper", damp="auto"), progress=False)
    damps = [r.damp for layer in report.layers for r in layer.values()]
    assert damps and all(d in DAMP_CANDIDATES for d in damps)
    from faspx.errors import UsageError

    with pytest.raises(UsageError, match="damp"):
        prune(tiny_model("opt"), calib(), 0.2, recipe("paper", damp="lots"), progress=False)


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
    report = prune(model, calib(16, 32), 0.2, recipe("paper", structure="auto"), progress=False)
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
    """On tiny OPT the paper's equal split wins, on tiny GQA LLaMA the FFN-only one (measured on held-out
    tokens: OPT 4.00e-4 vs 4.92e-4, LLaMA 1.61e-3 vs 2.88e-4, gaps of 23 % and 5.6x): auto, which judges
    candidates on calibration samples, must land on the better one."""
    ids, held_out = calib(32, 64), calib(8, 64, seed=50)
    ref = tiny_model(kind)(held_out).logits
    errors, chosen = {}, None
    for structure in ("fasp", "mlp", "auto"):
        model = tiny_model(kind)
        report = prune(model, ids, 0.3, recipe("paper", structure=structure), progress=False)
        errors[structure] = float(((model(held_out).logits - ref) ** 2).mean())
        chosen = report.n_remove
    assert errors["auto"] <= min(errors["fasp"], errors["mlp"]) * (1 + 1e-6)
    assert (chosen["attn"] > 0) == (kind == "opt")  # the two families really differ here


@torch.no_grad()
def test_a_restoration_that_raises_the_error_is_refused_unless_the_guard_is_off(monkeypatch):

    import faspx.solve

    real_restore = faspx.solve.restore
    monkeypatch.setattr(faspx.solve, "restore", lambda *a, **k: real_restore(*a, **k) * 3.0)  # a bad solve
    kept = {}
    for guard in (True, False):
        model = tiny_model("opt")
        report = prune(model, calib(16, 32), 0.3, recipe("paper", guard=guard), progress=False)
        results = [r for layer in report.layers for r in layer.values()]
        assert all(r.err_restored > r.err_removed for r in results) and report.recipe["guard"] is guard
        assert all(r.restored is not guard for r in results)
        kept[guard] = model.model.decoder.layers[0].fc2.weight.clone()
    plain = tiny_model("opt")
    prune(plain, calib(16, 32), 0.3, recipe("paper", restore=False), progress=False)
    assert torch.equal(kept[True], plain.model.decoder.layers[0].fc2.weight)  # the guard kept plain removal
    assert not torch.equal(kept[False], kept[True])


@torch.no_grad()
def test_per_layer_widths_keep_the_budget_in_steps_of_256():
    model = tiny_model("llama-wide")
    adapter = adapter_for(model.config)
    uniform = prune(tiny_model("llama-wide"), calib(8, 32), 0.35, recipe("paper", structure="mlp"), progress=False)
    report = prune(model, calib(8, 32), 0.35, recipe("paper", structure="mlp", ffn_widths="per-layer"), progress=False)
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
        report = prune(model, calib(8, 32), 0.35, recipe("paper", structure="mlp", ffn_widths="per-layer"),
                       progress=False)
        widths = report.layer_widths
        assert widths[loud] == max(widths) and widths.count(max(widths)) == 1, (loud, widths)


@pytest.mark.parametrize("kind, message", [("opt", "cannot take it"), ("qwen2", "cannot take it"),
                                           ("llama", "at least 512")])
def test_per_layer_widths_refuse_models_that_cannot_take_them(kind, message):
    from faspx.errors import UsageError

    with pytest.raises(UsageError, match=message):
        prune(tiny_model(kind), calib(), 0.2, recipe("paper", ffn_widths="per-layer"), progress=False)
    with pytest.raises(UsageError, match="not one of"):
        prune(tiny_model(kind), calib(), 0.2, recipe("paper", ffn_widths="ragged"), progress=False)


@torch.no_grad()
@pytest.mark.parametrize("structure", ["fasp", "mlp"])
def test_advancing_from_the_ffn_pass_equals_rerunning_the_layer(kind, structure, monkeypatch):
    """The next layer's inputs made from the FFN statistics pass are those of a rerun of the pruned layer."""
    import faspx.stream

    stashed = []
    real = faspx.stream.Stream.advance_stashed
    monkeypatch.setattr(faspx.stream.Stream, "advance_stashed", lambda *a, **k: stashed.append(1) or real(*a, **k))
    fast, slow = tiny_model(kind), tiny_model(kind)
    fast_report = prune(fast, calib(), 0.3, recipe("paper", structure=structure), progress=False)
    uses_stash = adapter_for(fast.config).ffn_residual_input(fast.config) is not None
    assert len(stashed) == (fast.config.num_hidden_layers if uses_stash else 0)
    monkeypatch.setattr(faspx.stream, "stash_fits", lambda *_: False)  # as when the inputs do not fit in memory
    slow_report = prune(slow, calib(), 0.3, recipe("paper", structure=structure), progress=False)
    assert len(stashed) == (fast.config.num_hidden_layers if uses_stash else 0)
    assert [{p: r.keep for p, r in layer.items()} for layer in fast_report.layers] == \
        [{p: r.keep for p, r in layer.items()} for layer in slow_report.layers]
    ids = calib(2, 16, seed=5)
    torch.testing.assert_close(fast(ids).logits, slow(ids).logits, rtol=1e-5, atol=1e-5)


def test_gram_of_bfloat16_values_is_as_accurate_as_float32():
    """exact_bf16_products keeps float32 accuracy for bfloat16-valued operands and restores the setting."""
    driver = importlib.import_module("faspx.stream")
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
def test_the_best_one_shot_options_beat_the_paper_on_held_out_tokens(kind):
    """On OPT the best faspx one-shot method must not be worse than the paper's FASP: structure auto,
    OBS selection and damping by measurement (the quality recipe's, with the split measured), on tokens
    that calibration did not see. Measured: tiny OPT 3.43e-4 vs 4.00e-4 (14 % better), tiny LLaMA
    2.79e-4 vs 1.61e-3; the bound keeps a margin of 5 %, so rounding cannot decide it."""
    ids, held_out = calib(32, 64), calib(8, 64, seed=50)
    ref = tiny_model(kind)(held_out).logits
    errors = {}
    for name, r in (("paper", recipe("paper")), ("best", recipe("quality", distill=0, structure="auto"))):
        model = tiny_model(kind)
        prune(model, ids, 0.3, r, progress=False)
        errors[name] = float(((model(held_out).logits - ref) ** 2).mean())
    assert errors["best"] < 0.95 * errors["paper"]


def output(layer, x, layer_kwargs):
    y = layer(x, **layer_kwargs)
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
@pytest.mark.parametrize("name", ["paper", "quality"])
def test_a_width_candidates_error_is_the_error_of_the_layer_it_leads_to(name):
    """The width search judges a candidate by the same solve that prunes the layer: write that solve
    into the layer, run it, and the error measured on its output is the one the search recorded."""
    from faspx.prune import width_errors
    from faspx.stream import Stream
    from faspx.widths import candidate_removals
    from faspx.writeback import write_pair

    model = tiny_model("llama-wide")
    adapter = adapter_for(model.config)
    layers, ffn = adapter.layers(model), adapter.pairs(model.config)[1]
    stream = Stream.capture(model, layers, calib(8, 32), torch.device("cpu"), torch.float32)
    inputs = [h.clone() for h in stream.hidden]
    removals = candidate_removals(1024)
    errors, solutions = width_errors(layers[0], stream, ffn, removals, recipe(name, distill=0))
    for k, n_remove in enumerate(removals[1:], start=1):
        pruned = copy.deepcopy(layers[0])
        write_pair(pruned, ffn, solutions[n_remove])
        measured = 0.0
        for x in inputs:  # sum over tokens of ||output change||^2 / ||layer input||^2
            delta = output(pruned, x, stream.layer_kwargs) - output(layers[0], x, stream.layer_kwargs)
            measured += float((delta.double().pow(2).sum(-1) / x.double().pow(2).sum(-1)).sum())
        assert errors[k] == pytest.approx(measured, rel=1e-3), (n_remove, errors[k], measured)
    assert errors == sorted(errors)  # fewer channels, more error
