"""Finding and loading a model: a local directory or a hub id, checked before any weight is read."""

from __future__ import annotations

import inspect
import json
import os
import socket
from pathlib import Path

import torch
from torch import nn

from faspx.adapters import Adapter, adapter_for
from faspx.errors import FaspxError, UsageError

HUB_HOST = "huggingface.co"


def hub_offline() -> bool:
    """True when the user told the HF libraries not to reach the hub."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an unreachable hub fails in seconds instead of after long retries."""
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve(model: str) -> tuple[str, dict]:
    """Where to load ``model`` from and the extra from_pretrained arguments; UsageError if it can't be.

    A local directory is used as is. Anything that looks like a path but does not exist is an error.
    A hub id is used from the local HF cache when the hub is offline or unreachable.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UsageError(f"{model} is a directory but holds no config.json: not a Hugging Face model")
        return str(path), {}
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(f"model path {model} does not exist (or is not a directory)")
    if hub_offline() or not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if hub_offline() else f"{HUB_HOST} cannot be reached"
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(model, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - any failure here means "not in the local cache"
            raise FaspxError(
                f"hub id {model!r} needs the Hugging Face hub, which is offline ({why}) and the model "
                "is not in the local cache; pass a local model directory instead"
            ) from err
        return model, {"local_files_only": True}
    return model, {}


def load_config(model: str):
    """The transformers config of ``model`` and its adapter (UsageError for unsupported types)."""
    from transformers import AutoConfig

    source, extra = resolve(model)
    if output_form(source) == "nemotron-nas":
        raise UsageError(
            f"{model} is a per-layer-widths or attention-removed checkpoint (nemotron-nas form): `faspx eval` runs "
            "it, `faspx bench` measures it, vLLM serves it; it cannot be pruned or exported again (`faspx build "
            "--target all` writes its ONNX graph)"
        )
    if Path(source).is_dir():
        check_config_file(Path(source) / "config.json")
        check_weight_files(source)
    try:
        config = AutoConfig.from_pretrained(source, **extra)
    except (OSError, ValueError, KeyError) as err:
        where = Path(source) / "config.json" if Path(source).is_dir() else source
        raise UsageError(f"{where} could not be read as a transformers config: {str(err).splitlines()[0]}") from None
    return config, adapter_for(config)


def check_config_file(path: Path) -> None:
    """UsageError naming ``path`` unless it is a JSON object (a truncated or edited config.json)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} is not valid JSON ({err}); restore it from the model's source") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a JSON object; restore it from the model's source")


def check_weight_files(directory: str | Path) -> None:
    """UsageError naming the file when a ``*.safetensors`` file in ``directory`` is truncated or not
    safetensors: its header says where every tensor ends, so this reads a few KB, not the weights.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "model.safetensors").write_bytes(b"short")
        >>> check_weight_files(d)
        Traceback (most recent call last):
        ...
        faspx.errors.UsageError: ...model.safetensors is not a complete safetensors file (5 bytes, ...
    """
    for path in sorted(Path(directory).expanduser().glob("*.safetensors")):
        size = path.stat().st_size
        why = None
        try:
            with path.open("rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if n < 2 or 8 + n > size:
                    why = "no complete header"
                else:
                    header = json.loads(f.read(n))
                    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                    if 8 + n + end > size:
                        why = f"the header says {8 + n + end:,} bytes"
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            why = "an unreadable header"
        if why:
            raise UsageError(f"{path} is not a complete safetensors file ({size:,} bytes, {why}): it was cut "
                             "short (an interrupted copy or download?); copy or export it again")


def meta_model(config) -> nn.Module:
    """The model's structure with no weights: enough to check a sparsity before loading anything.
    A nemotron-nas config comes only from ``hf_config``, which checked its code files."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=config.model_type == "nemotron-nas")


def hf_config(directory: str | Path):
    """The transformers config of a local checkpoint: stock, or a faspx nemotron-nas one (code checked).

    Example:
        >>> hf_config("~/.cache/faspx/smollm2-135m").model_type  # doctest: +SKIP
        'llama'
    """
    from transformers import AutoConfig

    from faspx.exporters.hf import is_nas_dir, nas_config

    return nas_config(directory) if is_nas_dir(directory) else AutoConfig.from_pretrained(directory)


def load_hf(directory: str | Path, dtype: torch.dtype | str = "auto") -> nn.Module:
    """A local checkpoint's model in eval mode: stock, or a faspx nemotron-nas one (code checked)."""
    from transformers import AutoModelForCausalLM

    from faspx.exporters.hf import check_nas_code, is_nas_dir

    nas = is_nas_dir(directory)
    if nas:
        check_nas_code(directory)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, trust_remote_code=nas).eval()


def output_form(source: str) -> str | None:
    """The ``form`` that a faspx output directory's fasp.json records (None for any other directory)."""
    from faspx.outputs import FaspInfo

    info = FaspInfo.of_dir(source) if Path(source).is_dir() else None
    return info.form if info is not None else None


def load_model(model: str, dtype: torch.dtype | str = "auto") -> tuple[nn.Module, object, Adapter]:
    """Load a stock model and tokenizer on the CPU in the checkpoint's dtype (or ``dtype``), in eval mode.

    Example:
        >>> model, tok, adapter = load_model("~/.cache/faspx/smollm2-135m")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    source, extra = resolve(model)
    config, adapter = load_config(model)
    net = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra).eval()
    return net, load_tokenizer(model), adapter


def load_tokenizer(model: str):
    """The tokenizer of ``model`` alone (cheap: a prune tokenizes its calibration text before it loads
    any weight, so that bad text costs no model load)."""
    from transformers import AutoTokenizer

    source, extra = resolve(model)
    try:
        return AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError) as err:
        raise UsageError(f"{model} has no usable tokenizer ({str(err).splitlines()[0]}): faspx needs its "
                         "tokenizer files beside config.json") from None


def local_dir(model: str) -> Path:
    """The local directory of ``model``: itself, or its snapshot in the HF cache for a hub id."""
    source, extra = resolve(model)
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, local_files_only=extra.get("local_files_only", False)))


def revision(model: nn.Module) -> str | None:
    """The hub commit the weights came from, when transformers recorded one."""
    return getattr(model.config, "_commit_hash", None)


def cache_keyword(model: nn.Module) -> str:
    """The forward keyword that takes the KV cache: ``cache`` where the model's forward has it (recent
    transformers, which deprecate ``past_key_values`` and drop it in 5.40), else ``past_key_values``.

    Example:
        >>> from transformers import AutoModelForCausalLM, LlamaConfig
        >>> cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        >>> cache_keyword(AutoModelForCausalLM.from_config(cfg)) in ("cache", "past_key_values")
        True
    """
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def returned_cache(output):
    """The KV cache a forward returned, under either name (see ``cache_keyword``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
