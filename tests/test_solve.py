"""faspx.solve.solve_pair: the one pair solve, on tensors (no nn.Module), against direct computations."""

import pytest
import torch

from faspx.errors import FaspxError
from faspx.solve import choose_keep, solve_pair
from tests.conftest import recipe


def data(n=12, m=5, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 2, n, dtype=torch.float64)[:, None]  # features of different energy
    x = torch.randn(n, tokens, generator=g, dtype=torch.float64) * scale
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    return x, w, [x[:, ::2] @ x[:, ::2].T, x[:, 1::2] @ x[:, 1::2].T]


def test_restoration_is_the_least_squares_fit_of_the_kept_columns():
    x, w, folds = data()
    s = solve_pair(w, folds, torch.arange(12), 4, recipe("paper", damp=0.0))
    expected = torch.linalg.lstsq(x[s.keep_cols].T, (w @ x).T).solution.T
    assert s.restored and torch.allclose(s.new_cols, expected, atol=1e-9)
    direct = float(((s.full_weight(12) @ x - w @ x) ** 2).sum() / ((w @ x) ** 2).sum())
    assert s.err_restored == pytest.approx(direct, rel=1e-9) and s.err_restored < s.err_removed


def test_no_restoration_keeps_the_columns_as_they_are():
    _, w, folds = data()
    s = solve_pair(w, folds, torch.arange(12), 4, recipe("wanda"))
    assert not s.restored and s.err_restored is None and s.damp is None
    assert torch.equal(s.new_cols, w[:, s.keep_cols]) and len(s.keep) == 8


def test_units_of_several_columns_are_kept_or_removed_whole():
    _, w, folds = data()
    col_unit = torch.arange(12) // 3  # four units of three columns (GQA: a v row feeds several o columns)
    s = solve_pair(w, folds, col_unit, 1, recipe("quality"))
    assert len(s.keep) == 3 and s.keep_cols.tolist() == [c for c in range(12) if c // 3 in s.keep.tolist()]


def test_the_guard_refuses_a_restoration_that_raises_the_error():
    # damping 1e6 shrinks the restored columns towards zero: worse than keeping them as they are
    _, w, folds = data()
    guarded = solve_pair(w, folds, torch.arange(12), 4, recipe("paper", damp=1e6))
    assert guarded.err_restored > guarded.err_removed and not guarded.restored
    assert torch.equal(guarded.new_cols, w[:, guarded.keep_cols])
    unguarded = solve_pair(w, folds, torch.arange(12), 4, recipe("paper", damp=1e6, guard=False))
    assert unguarded.restored and not torch.equal(unguarded.new_cols, w[:, unguarded.keep_cols])


def test_a_singular_gram_is_retried_with_more_damping():
    x, w, _ = data(tokens=6)  # 12 features, 6 tokens: G has rank 6, G[M, M] (8 x 8) is singular
    folds = [x[:, :3] @ x[:, :3].T, x[:, 3:] @ x[:, 3:].T]
    s = solve_pair(w, folds, torch.arange(12), 4, recipe("paper", damp=0.0))
    assert s.damp > 0 and torch.isfinite(s.new_cols).all()


def test_a_failed_solve_names_the_pair():
    _, w, _ = data()
    nan = [torch.full((12, 12), float("nan"), dtype=torch.float64)] * 2
    with pytest.raises(FaspxError, match="layer 7 ffn"):
        solve_pair(w, nan, torch.arange(12), 4, recipe("paper", selection="obs"), where="layer 7 ffn")


def test_auto_damping_picks_a_candidate_and_obs_selection_changes_the_choice():
    from faspx.restore import DAMP_CANDIDATES

    x, w, folds = data()
    x[1] = x[0] + 1e-3 * x[1]  # column 1 nearly copies column 0: OBS drops one of them, Wanda may not
    folds = [x[:, ::2] @ x[:, ::2].T, x[:, 1::2] @ x[:, 1::2].T]
    s = solve_pair(w, folds, torch.arange(12), 1, recipe("paper", damp="auto", selection="obs"))
    assert s.damp in DAMP_CANDIDATES
    dropped = set(range(12)) - set(s.keep.tolist())
    assert dropped <= {0, 1}
    wanda = choose_keep(w, folds[0] + folds[1], torch.arange(12), 1, recipe("paper"))
    assert len(wanda) == 11
