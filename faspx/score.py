"""Which channels of a linked pair to keep: the structured Wanda score and the top-k selection.

Pure tensor functions; the model walking lives in ``faspx.prune``.
"""

from __future__ import annotations

import torch


def score(weight: torch.Tensor, gram_diag: torch.Tensor, col_unit: torch.Tensor, n_units: int) -> torch.Tensor:
    """Structured Wanda score of each channel unit of a consumer matrix.

    score_j = ||X_j||_2 * sum_i |W_ij| per consumer column j, summed over the columns that
    belong to one unit (a unit is one producer row: with GQA one v row feeds several o columns).

    Example:
        >>> w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
        >>> score(w, torch.tensor([4.0, 1.0]), torch.arange(2), 2).tolist()
        [8.0, 2.5]
    """
    col_score = gram_diag.clamp_min(0).sqrt().float() * weight.float().abs().sum(dim=0)
    return torch.zeros(n_units, dtype=col_score.dtype, device=col_score.device).index_add_(0, col_unit, col_score)


def select(unit_score: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Sorted indices of the units to keep: all but the ``n_remove`` lowest-scoring ones.

    Example:
        >>> select(torch.tensor([0.3, 0.1, 0.9, 0.2]), 2).tolist()
        [0, 2]
    """
    n_keep = unit_score.numel() - n_remove
    if not 0 < n_keep <= unit_score.numel():
        raise ValueError(f"cannot keep {n_keep} of {unit_score.numel()} units")
    return torch.topk(unit_score, n_keep, sorted=False).indices.sort().values


def kept_columns(keep_units: torch.Tensor, col_unit: torch.Tensor) -> torch.Tensor:
    """Sorted consumer column indices whose unit is kept.

    Example:
        >>> kept_columns(torch.tensor([1]), torch.tensor([0, 1, 0, 1])).tolist()
        [1, 3]
    """
    mask = torch.zeros(int(col_unit.max()) + 1, dtype=torch.bool, device=col_unit.device)
    mask[keep_units.to(col_unit.device)] = True
    return mask[col_unit].nonzero().flatten()
