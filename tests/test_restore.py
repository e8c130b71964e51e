import pytest
import torch

from faspx.restore import add_gram, reconstruction_error, restore
from tests.conftest import calib, tiny_model


def test_restore_matches_lstsq():
    torch.manual_seed(0)
    x = torch.randn(12, 300, dtype=torch.float64)
    w = torch.randn(6, 12, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    got = restore(w, x @ x.T, keep, damp=0.0)
    # min ||W* X_M - W X||  <=>  X_M^T W*^T = X^T W^T in the least-squares sense
    expected = torch.linalg.lstsq(x[keep].T, (w @ x).T).solution.T
    assert torch.allclose(got, expected, atol=1e-9)


def test_damping_shrinks_towards_zero_and_is_relative():
    torch.manual_seed(0)
    x = torch.randn(8, 100, dtype=torch.float64)
    w = torch.randn(3, 8, dtype=torch.float64)
    keep = torch.arange(5)
    small, big = restore(w, x @ x.T, keep, 0.01), restore(w, x @ x.T, keep, 10.0)
    assert big.norm() < small.norm()
    # scaling X scales G; a relative damping gives the same solution
    assert torch.allclose(restore(w, 100 * x @ x.T, keep, 0.01), small, atol=1e-9)


def test_restore_reports_a_singular_problem():
    g = torch.zeros(4, 4, dtype=torch.float64)
    assert restore(torch.ones(2, 4), g, torch.arange(2), damp=0.0) is None


def test_reconstruction_error_equals_the_direct_one():
    torch.manual_seed(0)
    x, w, w2 = torch.randn(6, 50), torch.randn(4, 6), torch.randn(4, 6)
    direct = float(((w2 @ x - w @ x) ** 2).sum())
    assert abs(reconstruction_error(w, w2, x @ x.T) - direct) < 1e-6 * direct


def test_restoration_lowers_the_error_on_a_real_layer():
    """On the fc2 input of a real (tiny OPT) layer, W* X_M is closer to W X than plain removal."""
    model = tiny_model("opt")
    fc2 = model.model.decoder.layers[0].fc2
    inputs = []
    handle = fc2.register_forward_pre_hook(lambda _m, a: inputs.append(a[0].reshape(-1, fc2.in_features)))
    with torch.no_grad():
        model(calib(8, 32))
    handle.remove()
    x = torch.cat(inputs).double().T
    w = fc2.weight.double()
    keep = torch.arange(0, fc2.in_features, 2)
    removed = torch.zeros_like(w)
    removed[:, keep] = w[:, keep]
    restored = torch.zeros_like(w)
    restored[:, keep] = restore(w, x @ x.T, keep, damp=0.01)
    err_removed = ((removed @ x - w @ x) ** 2).sum()
    err_restored = ((restored @ x - w @ x) ** 2).sum()
    assert err_restored < 0.5 * err_removed


def test_choose_damp_prefers_little_damping_on_plentiful_data():
    from faspx.restore import DAMP_CANDIDATES, choose_damp

    torch.manual_seed(4)
    x = torch.randn(8, 4000, dtype=torch.float64)
    w = torch.randn(3, 8, dtype=torch.float64)
    folds = [x[:, :2000] @ x[:, :2000].T, x[:, 2000:] @ x[:, 2000:].T]
    assert choose_damp(w, folds, torch.arange(5)) == min(DAMP_CANDIDATES)


def test_choose_damp_damps_when_few_samples_would_overfit():
    """25 kept columns fitted on 30 tokens per fold: undamped least squares fits the removed columns'
    contribution as noise, and held out a larger damping wins."""
    from faspx.restore import DAMP_CANDIDATES, choose_damp

    torch.manual_seed(0)
    x = torch.randn(30, 60, dtype=torch.float64)
    w = torch.randn(4, 30, dtype=torch.float64)
    folds = [x[:, :30] @ x[:, :30].T, x[:, 30:] @ x[:, 30:].T]
    assert choose_damp(w, folds, torch.arange(25)) > min(DAMP_CANDIDATES)


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_add_gram_accumulates_the_whole_product(blocks):
    torch.manual_seed(0)
    x, y = torch.randn(6, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    gram = torch.zeros(7, 7, dtype=torch.float64)
    add_gram(gram, x, blocks)  # 7 features: blocks of uneven size
    add_gram(gram, y, blocks)
    assert torch.allclose(gram, x.T @ x + y.T @ y, atol=1e-12)
