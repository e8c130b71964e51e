"""faspx: structured pruning of LLMs (FASP and friends), exported as stock HF checkpoints and ONNX graphs.

Example:
    >>> import faspx
    >>> report = faspx.prune(model, calib_ids, sparsity=0.3, recipe="paper")  # doctest: +SKIP
    >>> result = faspx.prune_model("~/.cache/faspx/smollm2-135m", 0.3)  # doctest: +SKIP
"""

__version__ = "0.1.0"

from faspx.pipeline import build, export, prune_model  # noqa: E402
from faspx.prune import PruneReport, prune  # noqa: E402
from faspx.recipes import PRESETS, Recipe, get_recipe  # noqa: E402

__all__ = ["PRESETS", "PruneReport", "Recipe", "__version__", "build", "export", "get_recipe", "prune",
           "prune_model"]
