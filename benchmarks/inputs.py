"""Where each variant's checkpoints are, and an ONNX export for a variant that has none.

``--pruned`` is a faspx build output (``hf/`` and optionally ``onnx/`` inside, ``fasp.json`` at the
top) or a plain HF model directory; so may ``--dense`` be. A variant without an ONNX export (the
dense model, usually) is exported for the onnxruntime backend into a cache directory, with the same
settings (dtype, opset, exporter) as the other variant's export, so the two graphs differ only by
the pruning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from faspx.errors import UsageError
from faspx.outputs import FaspInfo

log = logging.getLogger("faspx")

HF_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json")


def variant_dirs(dense: Path, pruned: Path) -> dict[str, dict[str, Path | None]]:
    """{'dense': {'root', 'hf', 'onnx'}, 'pruned': {...}}: the HF checkpoint directory of each variant
    and its ONNX export directory (None when it has none)."""
    dirs = {}
    for name, path in (("dense", Path(dense).expanduser()), ("pruned", Path(pruned).expanduser())):
        if not path.is_dir():
            raise UsageError(f"--{name} {path} is not a directory")
        hf = path / "hf" if (path / "hf" / "config.json").exists() else path
        if not (hf / "config.json").exists():
            raise UsageError(f"--{name} {path} holds no HF model (no config.json, no hf/config.json)")
        if not any(next(hf.glob(pattern), None) for pattern in HF_WEIGHTS):
            raise UsageError(f"--{name} {hf} has a config.json but no weights (*.safetensors or *.bin)")
        onnx = next((d for d in (path / "onnx", path) if (d / "model.onnx").exists()), None)
        dirs[name] = {"root": path, "hf": hf, "onnx": onnx}
    return dirs


def quantized_dirs(pruned_root: Path) -> dict[str, Path]:
    """The quantized ONNX exports beside a pruned build's ``onnx/`` (``faspx export --quantize``):
    {'int8': OUT/onnx-int8, 'int4': OUT/onnx-int4}, those that exist.

    Example:
        >>> quantized_dirs(Path("/nonexistent"))
        {}
    """
    from faspx.exporters.quantize import PRECISIONS

    found = {p: Path(pruned_root) / f"onnx-{p}" for p in sorted(PRECISIONS, key=PRECISIONS.get, reverse=True)}
    return {p: d for p, d in found.items() if (d / "model.onnx").exists()}


# The config fields that must agree for two checkpoints to be a dense model and a pruning of it.
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings")


def _same_place(recorded: str, directory: Path) -> bool:
    """Whether fasp.json's ``source_model`` (a path, or a hub id) is ``directory``."""
    candidates = [Path(recorded).expanduser()]
    if not recorded.startswith((".", "/", "~")) and recorded.count("/") == 1:  # a hub id: its cached snapshot
        try:
            from faspx.models import local_dir

            candidates.append(local_dir(recorded))
        except Exception:  # noqa: BLE001 - not in the cache: it cannot be this directory
            pass
    return any(c.exists() and c.resolve() == directory.resolve() for c in candidates)


def check_pair(dirs: dict, configs: dict) -> list[str]:
    """UsageError unless ``--pruned`` is a pruning of ``--dense`` and both are models faspx supports.

    The pruned output's fasp.json names its source: where that is the dense directory, the pair is
    right. Otherwise (no fasp.json, or another source) the two must share the architecture and the
    shapes pruning leaves alone (SHAPE_FIELDS); the pair is then measured with a warning, returned
    for the report's notes.
    """
    from faspx.adapters import adapter_for

    for name, config in configs.items():
        if config.model_type == "nemotron-nas":  # faspx's form of a pruned LLaMA-family model
            continue
        try:
            adapter_for(config)
        except UsageError as err:
            raise UsageError(f"--{name} {dirs[name]['root']}: {err}") from None
    fields = SHAPE_FIELDS
    if configs["pruned"].model_type == "nemotron-nas" and configs["dense"].model_type != "nemotron-nas":
        dense_type = configs["dense"].model_type
        if dense_type not in adapter_for(configs["dense"]).per_layer_types:
            raise UsageError(f"--pruned {dirs['pruned']['root']} is a nemotron-nas checkpoint, a LLaMA-family form; "
                             f"--dense {dirs['dense']['root']} is {dense_type}: not the model it came from")
        fields = tuple(f for f in SHAPE_FIELDS if f != "model_type")
    differ = [f"{f} {getattr(configs['dense'], f, None)} vs {getattr(configs['pruned'], f, None)}"
              for f in fields if getattr(configs["dense"], f, None) != getattr(configs["pruned"], f, None)]
    info = FaspInfo.of_dir(dirs["pruned"]["root"]) or FaspInfo.of_dir(dirs["pruned"]["hf"])
    named = info is not None and any(_same_place(info.source_model, dirs["dense"][k]) for k in ("root", "hf"))
    if differ:
        source = f" (its fasp.json says it was pruned from {info.source_model})" if info is not None else ""
        raise UsageError(f"--pruned {dirs['pruned']['root']} is not a pruning of --dense {dirs['dense']['root']}"
                         f"{source}: {', '.join(differ)}")
    if named:
        return []
    why = (f"its fasp.json names {info.source_model} as the source" if info is not None
           else "it has no fasp.json naming its source")
    note = (f"--pruned {dirs['pruned']['root']}: {why}, not --dense {dirs['dense']['root']}; the two share the "
            "architecture and shapes, so they are compared, but check that this is the dense model it came from")
    log.warning("%s", note)
    return [note]


def onnx_settings(root: Path, onnx_dir: Path) -> dict:
    """How an existing export was made: {'fp16', 'opset', 'exporter'}, from the build's ``fasp.json``
    (``exports.onnx``) where there is one, else from the export's ``config.json`` dtype and defaults."""
    from faspx.exporters.onnx import DEFAULT_OPSET

    settings = {"fp16": False, "opset": DEFAULT_OPSET, "exporter": "auto"}
    config = onnx_dir / "config.json"
    if config.exists():
        data = json.loads(config.read_text())
        settings["fp16"] = data.get("dtype") == "float16"
        if data.get("faspx_exporter") == "builder":  # `faspx export` writes no top-level fasp.json
            settings["exporter"] = "builder"
    info = FaspInfo.of_dir(root)
    if info is not None:
        export = info.exports.get("onnx") or {}
        if export.get("dtype"):
            settings["fp16"] = export["dtype"] == "float16"
        settings["opset"] = int(export.get("opset") or settings["opset"])
        if export.get("exporter") in ("dynamo", "torchscript", "builder"):
            settings["exporter"] = export["exporter"]
    return settings


def export_for_bench(hf_dir: Path, cache: Path, settings: dict) -> tuple[Path, dict]:
    """An ONNX export of ``hf_dir`` with ``settings``, validated against PyTorch, cached under ``cache``
    by path, modification times and settings. Returns its directory and what was done."""
    import torch
    from transformers import AutoTokenizer

    from faspx.exporters.hf import is_nas_dir
    from faspx.exporters.onnx import export_onnx, validate_onnx
    from faspx.models import load_hf
    from faspx.outputs import atomic_dir

    stamp = [str(hf_dir.resolve())] + [f"{p.name}:{p.stat().st_mtime_ns}:{p.stat().st_size}"
                                       for p in sorted(hf_dir.iterdir()) if p.is_file()]
    # the layout version: 2 since exports carry genai_config.json (an older cached export lacks it)
    key = hashlib.sha1(json.dumps([stamp, settings, 2], sort_keys=True).encode()).hexdigest()[:16]
    target = Path(cache).expanduser() / key
    if (target / "model.onnx").exists() and (target / "bench-export.json").exists():
        return target, {**json.loads((target / "bench-export.json").read_text()), "cached": True}
    log.info("exporting %s to ONNX for the onnxruntime backend (%s, cached in %s)", hf_dir, settings, target)
    model = load_hf(hf_dir, dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=is_nas_dir(hf_dir))  # code checked
    except Exception:  # noqa: BLE001 - a model directory without tokenizer files still exports
        tokenizer = None
    with atomic_dir(target, force=True) as tmp:
        if settings["exporter"] == "builder":  # the same writer as the other graph: they differ by the pruning only
            from faspx.exporters.builder import export_builder

            export = export_builder(model, tokenizer, tmp)
            validation = validate_onnx(tmp, model, batch=1)  # its fused attention takes no left padding
        else:
            export = export_onnx(model, tokenizer, tmp, None, **settings)
            validation = validate_onnx(tmp, model)
        done = {"source": str(hf_dir), "settings": settings, "exporter": export["exporter"],
                "seconds": export["seconds"], "validation": validation}
        (tmp / "bench-export.json").write_text(json.dumps(done, indent=2) + "\n")
    return target, {**done, "cached": False}
