import pytest
import torch

from faspx.adapters import SUPPORTED, adapter_for
from faspx.errors import UsageError
from faspx.solve import PairSolution
from faspx.writeback import write_pair
from tests.conftest import calib, tiny_model


def test_unknown_architecture_lists_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(UsageError) as err:
        adapter_for(GPT2Config())
    assert "gpt2" in str(err.value) and all(t in str(err.value) for t in SUPPORTED)


def _drop_units(pair, n_units, seed=0):
    g = torch.Generator().manual_seed(seed)
    drop = torch.randperm(n_units, generator=g)[: n_units // 3]
    keep = torch.tensor(sorted(set(range(n_units)) - set(drop.tolist())))
    return drop, keep


@torch.no_grad()
def test_ffn_pair_zeroing_equals_physical_removal(kind):
    model = tiny_model(kind)
    adapter = adapter_for(model.config)
    ffn = adapter.pairs(model.config)[1]
    ids = calib(2, 16)
    n_units = int(ffn.col_unit.max()) + 1
    drop, keep = _drop_units(ffn, n_units)
    for layer in adapter.layers(model):
        for name in ffn.producers:  # zero the producer rows and their biases
            layer.get_submodule(name).weight[drop] = 0
            if layer.get_submodule(name).bias is not None:
                layer.get_submodule(name).bias[drop] = 0
        layer.get_submodule(ffn.consumer).weight[:, drop] = 0
    zeroed = model(ids).logits
    for layer in adapter.layers(model):
        consumer = layer.get_submodule(ffn.consumer).weight
        write_pair(layer, ffn, PairSolution(keep, keep, consumer[:, keep], 0.0))
    assert layer.get_submodule(ffn.consumer).weight.shape[1] == len(keep)
    torch.testing.assert_close(model(ids).logits, zeroed, atol=1e-5, rtol=0)


@torch.no_grad()
def test_attention_pair_is_linked_exactly(kind):
    """Zeroing V rows of units C, O columns of units C, or both: the same logits (GQA included)."""
    ids = calib(2, 16)
    outs = []
    for part in ("producer", "consumer", "both"):
        model = tiny_model(kind)
        adapter = adapter_for(model.config)
        attn = adapter.pairs(model.config)[0]
        n_units = int(attn.col_unit.max()) + 1
        drop, _ = _drop_units(attn, n_units)
        drop_cols = torch.isin(attn.col_unit, drop)
        for layer in adapter.layers(model):
            v = layer.get_submodule(attn.producers[0])
            if part in ("producer", "both"):
                v.weight[drop] = 0
                if v.bias is not None:
                    v.bias[drop] = 0
            if part in ("consumer", "both"):
                layer.get_submodule(attn.consumer).weight[:, drop_cols] = 0
        outs.append(model(ids).logits)
    dense = tiny_model(kind)(ids).logits
    assert (outs[0] - dense).abs().max() > 1e-4  # the removal does change the model
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs[0], outs[2], atol=1e-5, rtol=0)


@torch.no_grad()
def test_ffn_residual_input_is_what_the_ffn_output_is_added_to(kind):
    """The layer's output is that module's input plus the FFN consumer's output (None for post-LN OPT)."""
    model = tiny_model(kind)
    adapter = adapter_for(model.config)
    residual = adapter.ffn_residual_input(model.config)
    assert (residual is None) == (kind == "opt350")
    if residual is None:
        return
    layer = adapter.layers(model)[0]
    seen = {}
    hooks = [layer.get_submodule(residual).register_forward_pre_hook(lambda _m, a: seen.update(res=a[0])),
             layer.get_submodule(adapter.ffn_consumer).register_forward_hook(lambda _m, _a, o: seen.update(ffn=o))]
    x = model.get_input_embeddings()(calib(1, 16))
    out = layer(x, position_embeddings=getattr(model.model, "rotary_emb", lambda *a: None)(x, torch.arange(16)[None]))
    for h in hooks:
        h.remove()
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out, (seen["res"] + seen["ffn"]).reshape(out.shape))
