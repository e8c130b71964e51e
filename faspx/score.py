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


def norm_score(column_norms: torch.Tensor, col_unit: torch.Tensor, n_units: int) -> torch.Tensor:
    """2SSP's score of each unit: the mean over calibration samples of the L2 norm (over that sample's
    tokens) of the consumer's input column, summed over the unit's columns; no weight enters it.

    ``column_norms`` is that mean per consumer column (``faspx.stream.Moments.column_norms``).

    Example:
        >>> norm_score(torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0, 1, 1]), 2).tolist()
        [1.0, 2.5]
    """
    norms = column_norms.float()
    return torch.zeros(n_units, dtype=norms.dtype, device=norms.device).index_add_(0, col_unit, norms)


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


def select_obs(weight: torch.Tensor, gram: torch.Tensor, col_unit: torch.Tensor, n_remove: int,
               damp: float = 0.01, blocks: int = 32) -> torch.Tensor:
    """Restoration-aware selection (structured OBS): sorted indices of the units to keep.

    Removing the columns C of a unit while the others are restored by least squares costs
    tr(W_C [(G^-1)_CC]^-1 W_C^T) (||W_j||^2 / [G^-1]_jj for one column). Units are removed greedily
    in ``blocks`` rounds; after each round W and G^-1 are updated as if the removed columns were
    gone, so later choices see the restored weights. O(n^3) per matrix, like the restoration.

    Example:
        >>> x = torch.randn(4, 200, dtype=torch.float64); x[1] = x[0] + 1e-3 * x[1]
        >>> w = torch.tensor([[1.0, 0.5, 1.0, 1.0]] * 2, dtype=torch.float64)
        >>> # column 1 nearly copies column 0 and weighs less: column 0 takes its share when it goes
        >>> select_obs(w, x @ x.T, torch.arange(4), 1, damp=0.0).tolist()
        [0, 2, 3]
    """
    w = weight.to(torch.float64).clone()
    g = gram.to(device=w.device, dtype=torch.float64)
    n_units = int(col_unit.max()) + 1
    unit_cols = torch.stack([(col_unit == u).nonzero().flatten() for u in range(n_units)]).to(w.device)
    g = g + damp * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    hinv = torch.linalg.inv(g)
    alive = torch.ones(n_units, dtype=torch.bool, device=w.device)
    per_round = max(1, -(-n_remove // blocks))
    removed = 0
    while removed < n_remove:
        units = alive.nonzero().flatten()
        cols = unit_cols[units]  # (u, k)
        h_uu = hinv[cols.unsqueeze(2), cols.unsqueeze(1)]  # (u, k, k)
        w_u = w[:, cols].permute(1, 0, 2)  # (u, m, k)
        cost = (w_u @ torch.linalg.inv(h_uu) * w_u).sum(dim=(1, 2))
        take = units[torch.topk(cost, min(per_round, n_remove - removed), largest=False).indices]
        drop = unit_cols[take].flatten()
        # Remove the chosen columns and restore the rest (the OBS update), then forget them in G^-1.
        h_dd_inv = torch.linalg.inv(hinv[drop][:, drop])
        h_d = hinv[drop]
        # in place (addmm_): a temporary n x n product and a separate subtraction took half the time
        w.addmm_(w[:, drop] @ h_dd_inv, h_d, alpha=-1)
        hinv.addmm_(hinv[:, drop] @ h_dd_inv, h_d, alpha=-1)
        w[:, drop] = 0
        hinv[drop] = 0
        hinv[:, drop] = 0
        hinv[drop, drop] = 1  # keeps later gathers invertible; these columns are never chosen again
        alive[take] = False
        removed += len(take)
    return alive.nonzero().flatten()
