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
