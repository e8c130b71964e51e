"""The pair solve: which units of a linked pair to keep and the consumer's new columns, on tensors alone.

One function (``solve_pair``) does selection, the damping choice with its retries, the restoration
and the guard. The pruning driver, the ``--structure auto`` split search and the per-layer width
search all call it, so a candidate is judged by the same solve that then prunes the layer. No
``nn.Module`` here: the caller gathers the Gram matrices and writes the result back (faspx.prune).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from faspx.errors import FaspxError
from faspx.recipes import Recipe
from faspx.restore import choose_damp, reconstruction_error, restore
from faspx.score import kept_columns, norm_score, score, select, select_obs

log = logging.getLogger("faspx")

# When G[M, M] + delta I is not positive definite, retry with 10x, 100x, ... the damping (from
# at least MIN_RETRY_DAMP, so that a requested damping of 0 can recover too).
DAMP_RETRIES = 4
MIN_RETRY_DAMP = 1e-4


@dataclass
class PairSolution:
    """The solve of one pair: kept units and consumer columns, the consumer's new kept columns
    (float64, m x |M|), and the relative errors ||W'X - WX||^2 / ||WX||^2 of removal and restoration."""

    keep: torch.Tensor
    keep_cols: torch.Tensor
    new_cols: torch.Tensor
    err_removed: float | None
    err_restored: float | None = None
    damp: float | None = None
    restored: bool = False

    def full_weight(self, n_cols: int) -> torch.Tensor:
        """The consumer's new weight at full width: zeros in the removed columns."""
        full = self.new_cols.new_zeros(self.new_cols.shape[0], n_cols)
        full[:, self.keep_cols.to(full.device)] = self.new_cols
        return full


def choose_keep(weight: torch.Tensor, gram: torch.Tensor, col_unit: torch.Tensor, n_remove: int,
                recipe: Recipe, column_norms: torch.Tensor | None = None) -> torch.Tensor:
    """The units to keep: by the structured Wanda score, structured OBS or 2SSP's activation norm
    (``recipe.selection``; ``norm`` needs ``column_norms``, faspx.stream.Moments').

    Example:
        >>> from faspx.recipes import PRESETS
        >>> w = torch.tensor([[1.0, 0.1, 2.0]], dtype=torch.float64)
        >>> choose_keep(w, torch.eye(3, dtype=torch.float64), torch.arange(3), 1, PRESETS["paper"]).tolist()
        [0, 2]
    """
    col_unit = col_unit.to(gram.device)
    n_units = int(col_unit.max()) + 1
    if recipe.selection == "norm":
        if column_norms is None:
            raise ValueError("selection 'norm' needs the inputs' column norms")
        return select(norm_score(column_norms.to(gram.device), col_unit, n_units), n_remove)
    if recipe.selection == "obs":
        return select_obs(weight, gram, col_unit, n_remove,
                          damp=max(recipe.damp if recipe.damp != "auto" else 0.0, MIN_RETRY_DAMP))
    return select(score(weight, gram.diagonal(), col_unit, n_units), n_remove)


def solve_pair(weight: torch.Tensor, folds: list[torch.Tensor], col_unit: torch.Tensor, n_remove: int,
               recipe: Recipe, where: str = "pair", column_norms: torch.Tensor | None = None) -> PairSolution:
    """Prune ``n_remove`` units of a pair whose consumer is ``weight`` (m x n, float64) and whose inputs'
    Gram is ``folds[0] + folds[1]`` (even and odd calibration samples, n x n float64).

    ``col_unit[c]`` is the unit that consumer column c belongs to. With ``recipe.damp == "auto"`` the
    damping is the candidate whose restoration fitted on one fold reproduces the other best; a damping
    whose system is not positive definite is retried at 10x, 100x, ... A restoration that raises the
    error is refused when ``recipe.guard`` (plain removal is kept). ``where`` names the pair in messages;
    ``column_norms`` are what selection ``norm`` ranks (see ``choose_keep``); with that selection and no
    restoration ``folds`` may be empty (no Gram gathered: the errors are then None).

    Example:
        >>> from faspx.recipes import PRESETS
        >>> x = torch.randn(4, 64, dtype=torch.float64); w = torch.randn(3, 4, dtype=torch.float64)
        >>> g = [x[:, ::2] @ x[:, ::2].T, x[:, 1::2] @ x[:, 1::2].T]
        >>> s = solve_pair(w, g, torch.arange(4), 1, PRESETS["paper"])
        >>> s.new_cols.shape, s.err_restored <= s.err_removed
        (torch.Size([3, 3]), True)
    """
    if not folds:
        if recipe.restore or recipe.selection != "norm" or column_norms is None:
            raise ValueError("only selection 'norm' without restoration works without the Gram matrices")
        keep = select(norm_score(column_norms, col_unit.to(column_norms.device), int(col_unit.max()) + 1), n_remove)
        keep_cols = kept_columns(keep, col_unit.to(keep.device))
        return PairSolution(keep, keep_cols, weight[:, keep_cols.to(weight.device)], err_removed=None)
    gram = folds[0] + folds[1]
    keep = choose_keep(weight, gram, col_unit, n_remove, recipe, column_norms)
    keep_cols = kept_columns(keep, col_unit.to(gram.device))
    total = float(((weight @ gram) * weight).sum()) or 1.0

    def error(new_cols: torch.Tensor) -> float:
        full = torch.zeros_like(weight)
        full[:, keep_cols] = new_cols
        return reconstruction_error(weight, full, gram) / total

    new_cols = weight[:, keep_cols]
    solution = PairSolution(keep, keep_cols, new_cols, err_removed=error(new_cols))
    if not recipe.restore:
        return solution
    damp = choose_damp(weight, folds, keep_cols) if recipe.damp == "auto" else recipe.damp
    for attempt in range(DAMP_RETRIES):
        solution.damp = damp if attempt == 0 else max(damp, MIN_RETRY_DAMP) * 10**attempt
        restored = restore(weight, gram, keep_cols, solution.damp)
        if restored is not None:
            break
    else:
        raise FaspxError(
            f"{where}: the restoration failed (not positive definite or non-finite) even with damping "
            f"{solution.damp:g}; try --no-restore or --dtype float32"
        )
    solution.err_restored = error(restored)
    if solution.err_restored <= solution.err_removed or not recipe.guard:
        solution.new_cols, solution.restored = restored, True
    else:
        log.warning("%s: restoration raised the error (%.4g > %.4g); kept plain removal",
                    where, solution.err_restored, solution.err_removed)
    return solution
