"""Exports of a (pruned) model: a stock Hugging Face checkpoint and an ONNX decoder graph with KV cache.

Example:
    >>> from faspx.exporters import export_hf, export_onnx, validate_onnx, OnnxDecoder
    >>> export_hf(model, tokenizer, Path("out/hf"), fasp_info)  # doctest: +SKIP
    >>> export_onnx(model, tokenizer, Path("out/onnx"), fasp_info)  # doctest: +SKIP
    >>> validate_onnx(Path("out/onnx"), model)  # doctest: +SKIP
    >>> OnnxDecoder("out/onnx").generate_text("Hello", max_new_tokens=8)  # doctest: +SKIP
"""

from faspx.exporters.files import check_disk, is_model_dir, require_model_dir
from faspx.exporters.hf import export_hf
from faspx.exporters.onnx import export_onnx, validate_onnx
from faspx.exporters.ort_runtime import OnnxDecoder

__all__ = ["OnnxDecoder", "check_disk", "export_hf", "export_onnx", "is_model_dir", "require_model_dir",
           "validate_onnx"]
