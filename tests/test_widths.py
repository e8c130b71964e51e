"""faspx/widths.py: allowed widths, the exact allocation (against brute force) and the DeciLM width formula."""

import itertools

import pytest
import torch

from faspx.widths import WIDTH_STEP, allocate, block_configs, candidate_removals


def test_candidate_removals_leave_positive_multiples_of_the_step():
    for width in (512, 1000, 1536, 11008, 14336):
        removals = candidate_removals(width)
        assert removals == sorted(removals) and len(set(removals)) == len(removals)
        kept = [width - r for r in removals]
        assert all(k > 0 and k % WIDTH_STEP == 0 for k in kept)
        assert (0 in removals) == (width % WIDTH_STEP == 0)
        assert min(kept) == WIDTH_STEP and max(kept) == width // WIDTH_STEP * WIDTH_STEP


def brute_force(errors: torch.Tensor, removals: list[int], total: int) -> float:
    best = float("inf")
    for picks in itertools.product(range(len(removals)), repeat=errors.shape[0]):
        if sum(removals[k] for k in picks) == total:
            best = min(best, sum(float(errors[i, k]) for i, k in enumerate(picks)))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_allocate_finds_the_least_total_error(seed):
    gen = torch.Generator().manual_seed(seed)
    # error curves that rise with the cut, at different rates per layer
    errors = torch.rand(4, 5, generator=gen).cumsum(dim=1) * torch.rand(4, 1, generator=gen)
    errors[:, 0] = 0
    removals = [0, 256, 512, 768, 1024]
    for total in range(0, 4 * 1024 + 1, 256):
        picks = allocate(errors, removals, total)
        assert sum(removals[k] for k in picks) == total
        cost = sum(float(errors[i, k]) for i, k in enumerate(picks))
        assert cost == pytest.approx(brute_force(errors, removals, total))


def test_allocate_rounds_the_total_to_a_reachable_count():
    errors = torch.zeros(3, 3)
    removals = [232, 488, 744]  # a width of 1000: no layer can stay whole
    assert sum(removals[k] for k in allocate(errors, removals, 3 * 300)) == 2 * 232 + 488  # 900 -> 952 (nearest)
    assert sum(removals[k] for k in allocate(errors, removals, 3 * 400)) == 232 + 2 * 488  # 1200 -> 1208
    assert sum(removals[k] for k in allocate(errors, removals, 10**6)) == 3 * 744  # clamped


def test_allocate_cuts_the_cheap_layer():
    errors = torch.tensor([[0.0, 10.0, 30.0], [0.0, 1.0, 2.0], [0.0, 5.0, 40.0]])
    assert allocate(errors, [0, 256, 512], 512) == [0, 2, 0]
    assert allocate(errors, [0, 256, 512], 768) == [0, 2, 1]


def test_block_configs_have_the_attention_and_the_exact_widths():
    blocks = block_configs([1536, 768, 1000], 3, [True, False, True])
    assert len(blocks) == 3
    assert [b["attention"] for b in blocks] == [
        {"no_op": False, "replace_with_linear": False, "n_heads_in_group": 3},
        {"no_op": True, "replace_with_linear": False},
        {"no_op": False, "replace_with_linear": False, "n_heads_in_group": 3}]
    assert [b["ffn"]["intermediate_size"] for b in blocks] == [1536, 768, 1000]
    assert all("ffn_mult" not in b["ffn"] for b in blocks)  # vLLM reads intermediate_size only without it
