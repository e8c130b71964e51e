"""faspx: FASP structured pruning of LLMs, exported as stock HF checkpoints and ONNX graphs.

Example:
    >>> import faspx
    >>> report = faspx.prune(model, calib_ids, sparsity=0.3)  # doctest: +SKIP
"""

__version__ = "0.1.0"

from faspx.prune import PruneReport, prune  # noqa: E402

__all__ = ["PruneReport", "__version__", "prune"]
