import pytest
import torch

from faspx.adapters import adapter_for
from faspx.budget import linear_weights, max_sparsity, pair_weights, plan
from faspx.errors import UsageError
from faspx.prune import prune
from tests.conftest import calib, recipe, tiny_model


def removed_weights(dense, pruned) -> tuple[int, int, int]:
    """(removed decoder linear weights, total, weights of one unit of the biggest pair), measured on
    the models: the FFN by its shrunk matrices, the attention pair by its zero V rows."""
    adapter = adapter_for(dense.config)
    removed = total = 0
    unit_max = 0
    for layer_d, layer_p in zip(adapter.layers(dense), adapter.layers(pruned), strict=True):
        total += linear_weights(layer_d)
        removed += linear_weights(layer_d) - linear_weights(layer_p)
        attn = adapter.pairs(dense.config)[0]
        v = layer_p.get_submodule(attn.producers[0]).weight
        zero_rows = int((v.abs().sum(dim=1) == 0).sum())
        units = int(attn.col_unit.max()) + 1
        removed += zero_rows * pair_weights(layer_d, attn) // units
        for pair in adapter.pairs(dense.config):
            units = int(pair.col_unit.max()) + 1
            unit_max = max(unit_max, pair_weights(layer_d, pair) // units)
    return removed, total, unit_max


@pytest.mark.parametrize("structure", ["fasp", "mlp"])
@pytest.mark.parametrize("sparsity", [0.1, 0.3])
def test_removed_fraction_matches_the_request(kind, structure, sparsity):
    dense, model = tiny_model(kind), tiny_model(kind)
    prune(model, calib(), sparsity, recipe("paper", structure=structure), progress=False)
    removed, total, unit_max = removed_weights(dense, model)
    n_layers = len(adapter_for(dense.config).layers(dense))
    # within one channel per pair in every layer
    assert abs(removed - sparsity * total) <= 2 * n_layers * unit_max
    if structure == "mlp":
        v = adapter_for(dense.config).layers(model)[0].get_submodule("self_attn.v_proj").weight
        assert (v.abs().sum(dim=1) > 0).all()  # attention untouched


def test_ratio_is_the_same_in_both_pairs():
    model = tiny_model("llama")
    budget = plan(model, adapter_for(model.config), 0.25, "fasp")
    r_attn = budget.n_remove["attn"] / budget.units["attn"]
    r_ffn = budget.n_remove["ffn"] / budget.units["ffn"]
    assert abs(r_attn - r_ffn) < 1.0 / min(budget.units.values())


@pytest.mark.parametrize("bad", [-0.1, 0.95, 5.0])
def test_sparsity_out_of_range_names_the_legal_range(bad):
    model = tiny_model("opt")
    adapter = adapter_for(model.config)
    with pytest.raises(UsageError, match=r"must be in \[0, 0\.\d+\)"):
        plan(model, adapter, bad, "fasp")
    s_max = max_sparsity(model, adapter, "fasp")
    with pytest.raises(UsageError, match=f"{s_max:.4f}"):
        plan(model, adapter, s_max, "fasp")


def test_plan_runs_on_a_meta_model():
    from faspx.models import meta_model

    model = meta_model(tiny_model("qwen2").config)
    assert next(model.parameters()).device == torch.device("meta")
    assert plan(model, adapter_for(model.config), 0.2).n_remove["ffn"] > 0


def test_auto_candidates_hold_the_paper_and_mlp_plans_and_reach_the_budget(kind):
    from faspx.budget import candidates

    model = tiny_model(kind)
    adapter = adapter_for(model.config)
    options = candidates(model, adapter, 0.2)
    keys = [b.n_remove for b in options]
    assert plan(model, adapter, 0.2, "fasp").n_remove in keys
    assert keys[0]["attn"] == 0 and abs(keys[0]["ffn"] - plan(model, adapter, 0.2, "mlp").n_remove["ffn"]) <= 1
    assert len(keys) == len({tuple(k.values()) for k in keys}) >= 3
    assert [k["attn"] for k in keys] == sorted(k["attn"] for k in keys)
    for budget in options:
        unit_max = max(budget.unit_weights.values())
        assert abs(budget.removed_fraction - 0.2) * budget.layer_weights <= unit_max
    assert plan(model, adapter, 0.2, "auto").n_remove == plan(model, adapter, 0.2, "fasp").n_remove
