"""What every exported directory shares: disk checks, the model-directory test, config and side files.

An exported directory (HF or ONNX) always carries a stock ``config.json`` (no ``auto_map``, no custom
code), ``generation_config.json``, the tokenizer files and, when known, ``fasp.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from faspx.errors import FaspxError, UsageError
from faspx.outputs import FaspInfo, write_json

log = logging.getLogger("faspx")

GB = 1e9
# Side files (config, tokenizer, fasp.json) never take more than this; it is added to every estimate.
SIDE_FILES_BYTES = 64 * 2**20


def check_disk(out_dir: str | Path, nbytes: int) -> None:
    """Raise FaspxError when the file system of ``out_dir`` has less than ``nbytes`` free.

    ``out_dir`` need not exist yet: its nearest existing parent is measured.

    Example:
        >>> check_disk("/tmp/does/not/exist/yet", 1024)
    """
    probe = Path(out_dir).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < nbytes:
        raise FaspxError(
            f"not enough disk space for the export to {out_dir}: it needs about {nbytes / GB:.2f} GB "
            f"but only {free / GB:.2f} GB are free on {probe}"
        )


def is_model_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory holding a ``config.json`` (an HF, faspx or ONNX export)."""
    path = Path(path).expanduser()
    return path.is_dir() and (path / "config.json").is_file()


def require_model_dir(path: str | Path, need: tuple[str, ...] = ()) -> Path:
    """``path`` as a Path when it is a model directory holding ``need`` files too; else UsageError."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UsageError(f"{path} does not exist or is not a directory")
    if not is_model_dir(path):
        raise UsageError(f"{path} holds no config.json: it is not a Hugging Face or faspx model directory")
    missing = [name for name in need if not (path / name).exists()]
    if missing:
        raise UsageError(f"{path} holds no {', '.join(missing)}")
    return path


def write_config(model, out_dir: Path, dtype: str, kv_layers: list[int] | None = None,
                 extra: dict | None = None) -> None:
    """A stock config.json for ``model`` (its current, reduced FFN width), saved weights in ``dtype``.

    ``auto_map`` is dropped so that nothing points at custom code: stock classes load the directory.
    ``kv_layers`` (the layers that kept their attention, when some did not) is written as
    ``faspx_kv_layers``: the graph's ``past_key_values.{j}`` is layer ``faspx_kv_layers[j]``'s cache.
    """
    data = model.config.to_diff_dict()
    if kv_layers is not None and len(kv_layers) < model.config.num_hidden_layers:
        data["faspx_kv_layers"] = kv_layers
    if not data.get("architectures"):  # set by save_pretrained only; a model built from a config lacks it
        data["architectures"] = [type(model).__name__]
    data.pop("auto_map", None)
    data.pop("torch_dtype", None)
    data["dtype"] = dtype
    data["use_cache"] = True
    data.update(extra or {})  # faspx's own marks (faspx_exporter)
    write_json(out_dir / "config.json", data)


def fix_saved_config(out_dir: Path, dtype: str) -> None:
    """Post-process a config.json written by ``save_pretrained``: no ``auto_map``, the saved dtype."""
    path = out_dir / "config.json"
    data = json.loads(path.read_text())
    data.pop("auto_map", None)
    data.pop("torch_dtype", None)
    data["dtype"] = dtype
    write_json(path, data)


def write_side_files(model, tokenizer, out_dir: Path, fasp_info: FaspInfo | None) -> None:
    """generation_config.json, the tokenizer files and fasp.json (when given)."""
    from transformers import GenerationConfig

    gen = getattr(model, "generation_config", None)
    if gen is None:
        gen = GenerationConfig.from_model_config(model.config)
    gen.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    else:
        log.warning("no tokenizer given: %s has no tokenizer files", out_dir)
    if fasp_info is not None:
        fasp_info.write(out_dir / "fasp.json")


def weight_file_bytes(onnx_dir: Path) -> int:
    """Bytes of ``model.onnx`` and its external data (``model.onnx_data``, or the builder's
    ``model.onnx.data``): what a runtime loads."""
    return sum(p.stat().st_size for p in Path(onnx_dir).iterdir() if p.name.startswith("model.onnx"))


def dir_summary(out_dir: Path) -> dict:
    """Files (name -> bytes) and the total size of a written directory."""
    files = {p.name: p.stat().st_size for p in sorted(Path(out_dir).iterdir()) if p.is_file()}
    return {"dir": str(out_dir), "files": files, "bytes": sum(files.values())}


def dtype_name(dtype) -> str:
    """'float32' for torch.float32 or 'float32'."""
    return str(dtype).removeprefix("torch.")
