"""The stock Hugging Face export: safetensors + config + tokenizer that plain transformers (and vLLM) load.

The FFN width FASP left is already in ``model.config`` (``ffn_dim`` / ``intermediate_size``), so
``save_pretrained`` writes a config that ``AutoModelForCausalLM.from_pretrained`` reads without
``trust_remote_code``; ``auto_map`` is removed in case the source had one.

A model pruned with ``--ffn-widths per-layer`` (layers of different FFN widths) or ``--recipe 2ssp``
(layers without attention) cannot be stock: it is written in the nemotron-nas (DeciLM) form that vLLM
serves (``block_configs``: per layer ``attention.no_op`` and the exact ``ffn.intermediate_size``), with
the two small code files of exporters/decilm that transformers loads with ``trust_remote_code=True``.

Example:
    >>> from faspx.exporters import export_hf
    >>> summary = export_hf(model, tokenizer, Path("out/hf"), fasp_info)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from faspx.adapters import adapter_for, attention_shape
from faspx.errors import FaspxError, UsageError
from faspx.exporters.decilm import AUTO_MAP, CODE_FILES
from faspx.exporters.files import (
    SIDE_FILES_BYTES,
    check_disk,
    dir_summary,
    dtype_name,
    fix_saved_config,
    write_side_files,
)
from faspx.outputs import FaspInfo, write_json
from faspx.widths import block_configs

log = logging.getLogger("faspx")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Checkpoints above this are split into shards (the hub's and vLLM's usual shard size).
MAX_SHARD_SIZE = "5GB"


def resolve_save_dtype(model: nn.Module, dtype: str | torch.dtype | None) -> torch.dtype:
    """The dtype the weights are saved in: ``auto``/None keeps the model's own."""
    if dtype in (None, "auto"):
        return model.dtype
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise UsageError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)} (or auto)")
    return DTYPES[dtype]


def estimate_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes the export will take: every stored tensor (tied ones once) in ``dtype``, plus side files."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * (dtype.itemsize if tensor.is_floating_point() else tensor.element_size())
    return total + SIDE_FILES_BYTES


def converted_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The state dict in ``dtype`` (None when it already is); tied tensors stay shared after conversion."""
    state = model.state_dict()
    if all(t.dtype == dtype for t in state.values() if t.is_floating_point()):
        return None
    done: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in done:
            done[key] = tensor.detach().to(dtype)
        out[name] = done[key]
    return out


def export_hf(model: nn.Module, tokenizer, out_dir: Path, fasp_info: FaspInfo | None = None,
              dtype: str | torch.dtype = "float32") -> dict:
    """Write ``model`` as an HF checkpoint into ``out_dir``; return {dir, files, bytes, dtype, form}.

    Files: ``model.safetensors`` (``model-0000i-of-0000n.safetensors`` + index above 5 GB),
    ``config.json``, ``generation_config.json``, the tokenizer files and ``fasp.json`` (when
    ``fasp_info`` is given: its ``form`` decides stock or nemotron-nas; stock without it).
    ``dtype`` (float32, float16, bfloat16 or auto) is the dtype of the saved weights; the model in
    memory is not changed. ``out_dir`` may exist (e.g. the temporary directory of
    ``faspx.outputs.atomic_dir``); a FaspxError is raised before anything is written when the disk
    is too small.
    """
    if not type(model).__module__.startswith("transformers."):
        raise UsageError(f"{type(model).__name__} is not a stock transformers class: a stock export needs one")
    save_dtype = resolve_save_dtype(model, dtype)
    out_dir = Path(out_dir)
    check_disk(out_dir, estimate_bytes(model, save_dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    state = converted_state_dict(model, save_dtype)
    log.info("writing the HF checkpoint (%s)", dtype_name(save_dtype))
    config_dtype = getattr(model.config, "dtype", None)
    try:
        model.save_pretrained(out_dir, state_dict=state, max_shard_size=MAX_SHARD_SIZE)
    finally:
        # save_pretrained records the in-memory dtype in the config object; keep the model as it was.
        model.config.dtype = config_dtype
    fix_saved_config(out_dir, dtype_name(save_dtype))
    form = fasp_info.form if fasp_info is not None else "stock"
    from faspx.depth import attention_layers  # faspx.depth imports this package's DeciLM code

    adapter = adapter_for(model.config)
    widths, attention = adapter.ffn_widths(model), attention_layers(model, adapter)
    if form == "nemotron-nas":
        write_nas_config(model, out_dir, widths, attention)
    elif len(set(widths)) > 1 or not all(attention):
        raise FaspxError(f"the layers have different FFN widths {sorted(set(widths))} or removed attention but the "
                         f"output form is {form!r}: only the nemotron-nas form can hold them")
    write_side_files(model, tokenizer, out_dir, fasp_info)
    return {**dir_summary(out_dir), "dtype": dtype_name(save_dtype), "form": form}


def write_nas_config(model: nn.Module, out_dir: Path, widths: list[int], attention: list[bool]) -> None:
    """Turn the saved LLaMA config into the nemotron-nas form (per-layer attention and FFN width) and add
    its code files."""
    path = out_dir / "config.json"
    data = json.loads(path.read_text())
    heads, kv_heads, _ = attention_shape(model.config)
    data.update(model_type="nemotron-nas", architectures=["DeciLMForCausalLM"], auto_map=AUTO_MAP,
                intermediate_size=max(widths),
                block_configs=block_configs(widths, heads // kv_heads, attention))
    write_json(path, data)
    for code in CODE_FILES:
        shutil.copyfile(code, out_dir / code.name)
    no_attention = [i for i, a in enumerate(attention) if not a]
    what = [*(["different FFN widths"] if len(set(widths)) > 1 else []),
            *([f"no attention in layers {no_attention}"] if no_attention else [])]
    log.warning("%s: wrote the nemotron-nas (DeciLM) form, which vLLM serves and transformers loads with "
                "trust_remote_code=True; stock LlamaForCausalLM cannot load it", " and ".join(what))
    if attention and not attention[0]:
        log.warning("layer 0 has no attention: vLLM 0.32's nemotron_nas model cannot run such a first layer "
                    "(its norm expects the residual that layer 0's attention would start)")


def is_nas_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a nemotron-nas checkpoint (its config.json's ``model_type``)."""
    config = Path(directory).expanduser() / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == "nemotron-nas"
    except (OSError, ValueError, AttributeError):
        return False


def check_nas_code(directory: str | Path) -> None:
    """UsageError unless the directory's code files are byte for byte the ones faspx writes:
    ``trust_remote_code`` runs them, and faspx runs no code it did not ship."""
    path = Path(directory).expanduser()
    foreign = [f.name for f in CODE_FILES if not (path / f.name).is_file() or
               (path / f.name).read_bytes() != f.read_bytes()]
    if foreign:
        raise UsageError(f"{path} is marked nemotron-nas but its {', '.join(foreign)} are not the ones faspx writes; "
                         "faspx will not run that code (load it yourself with trust_remote_code if you trust it)")


def nas_config(directory: str | Path):
    """The DeciLM config of a nemotron-nas checkpoint that faspx wrote (its code checked first)."""
    from transformers import AutoConfig

    check_nas_code(directory)
    return AutoConfig.from_pretrained(Path(directory).expanduser(), trust_remote_code=True)


def load_nas(directory: str | Path, dtype: torch.dtype | str = "auto") -> tuple[nn.Module, object]:
    """Load a nemotron-nas checkpoint that faspx wrote (model, tokenizer), through its code files.

    ``trust_remote_code`` runs the directory's code files, so they must be byte for byte the ones
    faspx writes (a UsageError otherwise: faspx runs no code it did not ship).

    Example:
        >>> model, tokenizer = load_nas("out/max/hf")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(directory).expanduser()
    check_nas_code(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=True).eval()
    # the tokenizer is stock, but transformers reads config.json's auto_map to find it (and would ask)
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=True)
