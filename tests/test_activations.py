"""benchmarks/activations.py: the first-token share of each consumer's Gram trace."""

import torch

from faspx.benchmarks.activations import first_token_shares
from tests.conftest import calib, tiny_model


def test_one_row_per_layer_and_pair_with_shares_in_range():
    rows = first_token_shares(tiny_model("llama"), calib(3, 16))
    assert [(r["layer"], r["pair"]) for r in rows] == [(0, "attn"), (0, "ffn"), (1, "attn"), (1, "ffn")]
    for r in rows:
        assert 0 < r["first_token_share"] < 1
        assert r["max_over_mean_diag"] >= 1
        assert 1 <= r["first_token_channels_90"] <= 160  # the widest consumer input (down_proj)


def test_a_single_token_window_is_all_first_token():
    rows = first_token_shares(tiny_model("llama"), calib(2, 1))
    assert all(abs(r["first_token_share"] - 1) < 1e-12 for r in rows)


def test_shares_match_the_consumer_inputs():
    model, ids = tiny_model("llama"), calib(3, 16)
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0][0]))
    with torch.no_grad():
        for sample in ids:
            model(input_ids=sample.unsqueeze(0))
    handle.remove()
    x = torch.stack(seen).double()  # (samples x seqlen x width)
    diag = x.pow(2).sum(dim=(0, 1))
    row = next(r for r in first_token_shares(model, ids) if (r["layer"], r["pair"]) == (1, "ffn"))
    assert abs(row["first_token_share"] - float(x[:, 0].pow(2).sum() / diag.sum())) < 1e-9
    assert abs(row["max_over_mean_diag"] - float(diag.max() / diag.mean())) < 1e-9
