import torch

from faspx.adapters import LLAMA
from faspx.score import kept_columns, score, select
from tests.conftest import tiny_model


def test_score_is_input_norm_times_column_abs_sum():
    torch.manual_seed(0)
    w, x = torch.randn(5, 7), torch.randn(7, 40)
    gram = x @ x.T
    expected = x.norm(dim=1) * w.abs().sum(dim=0)
    assert torch.allclose(score(w, gram.diagonal(), torch.arange(7), 7), expected, rtol=1e-5)


def test_score_sums_the_columns_of_a_unit():
    w = torch.ones(2, 4)
    got = score(w, torch.tensor([1.0, 4.0, 9.0, 16.0]), torch.tensor([0, 1, 0, 1]), 2)
    assert got.tolist() == [2 * (1 + 3), 2 * (2 + 4)]


def test_select_keeps_the_highest_scores_sorted():
    keep = select(torch.tensor([5.0, 1.0, 4.0, 0.5, 3.0]), 2)
    assert keep.tolist() == [0, 2, 4]


def test_select_refuses_to_remove_everything():
    try:
        select(torch.ones(3), 3)
    except ValueError:
        return
    raise AssertionError("removing every unit must fail")


def test_gqa_columns_follow_their_value_row():
    model = tiny_model("llama")  # 4 query heads, 2 kv heads, head_dim 24
    attn = LLAMA.pairs(model.config)[0]
    assert attn.col_unit.numel() == 4 * 24 and int(attn.col_unit.max()) + 1 == 2 * 24
    # query heads 0,1 read kv head 0; heads 2,3 read kv head 1
    cols = kept_columns(torch.tensor([3, 24 + 5]), attn.col_unit).tolist()
    assert cols == [3, 24 + 3, 48 + 5, 72 + 5]


def _lsq_error(w, g, keep):
    from faspx.restore import reconstruction_error, restore

    full = torch.zeros_like(w)
    full[:, keep] = restore(w, g, keep, damp=0.0)
    return reconstruction_error(w, full, g)


def test_obs_selection_follows_the_brute_force_greedy_order():
    """Each round of select_obs (one unit per round) removes the unit whose removal, with the rest
    restored by least squares, costs least: checked against trying every unit."""
    from faspx.score import select_obs

    torch.manual_seed(0)
    x = torch.randn(8, 60, dtype=torch.float64)
    x[5] = 0.95 * x[2] + 0.05 * x[5]  # a nearly redundant column the Wanda score cannot see
    w = torch.randn(5, 8, dtype=torch.float64)
    g = x @ x.T
    keep = list(range(8))
    for n_remove in range(1, 5):
        best = min(keep, key=lambda j: _lsq_error(w, g, torch.tensor([k for k in keep if k != j])))
        keep.remove(best)
        got = select_obs(w, g, torch.arange(8), n_remove, damp=0.0, blocks=n_remove)
        assert got.tolist() == keep


def test_obs_beats_wanda_on_redundant_columns():
    from faspx.score import select_obs

    torch.manual_seed(1)
    x = torch.randn(16, 200, dtype=torch.float64)
    x[8:] = x[:8] + 0.01 * torch.randn(8, 200, dtype=torch.float64)  # half the columns are copies
    w = torch.randn(6, 16, dtype=torch.float64)
    g = x @ x.T
    obs = select_obs(w, g, torch.arange(16), 8, damp=0.0)
    wanda = select(score(w, g.diagonal(), torch.arange(16), 16), 8)
    assert _lsq_error(w, g, obs) < 0.5 * _lsq_error(w, g, wanda)


def test_obs_removes_whole_gqa_units():
    from faspx.score import select_obs

    torch.manual_seed(2)
    x = torch.randn(6, 100, dtype=torch.float64)
    col_unit = torch.tensor([0, 1, 2, 0, 1, 2])  # two query heads share three v rows
    keep = select_obs(torch.randn(3, 6, dtype=torch.float64), x @ x.T, col_unit, 2, damp=0.01)
    assert keep.numel() == 1 and 0 <= int(keep) < 3
