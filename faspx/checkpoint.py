"""Resume an interrupted prune: the pruned layers and the calibration stream, saved after every layer.

A prune of a large model takes hours; an interruption (a preempted job, a timeout) should cost the
layer being pruned, not the run. With ``--resume``, ``faspx.prune.prune`` saves after each layer:
that layer's tensors (``layer-NNNN.safetensors``), the stream entering the next layer
(``stream.safetensors``), and ``state.json`` (how many layers are done, their records, the decisions
taken before the walk). A rerun of the same command loads them and walks on from there; everything
it loads is bit-exact, so the output is the same bytes as an uninterrupted run.

``state.json`` holds a key of everything that decides the output (model files, sparsity, recipe,
calibration, device, dtype, faspx version): a checkpoint made by another command is refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from faspx.errors import UsageError

log = logging.getLogger("faspx")
STATE = "state.json"


def checkpoint_dir(out: str | Path) -> Path:
    """Where the checkpoint of output ``out`` lives: a hidden sibling, ``.OUT.resume``.

    Example:
        >>> checkpoint_dir("runs/opt").name
        '.opt.resume'
    """
    out = Path(out).expanduser().absolute()
    return out.with_name(f".{out.name}.resume")


def model_stamp(model_name: str) -> dict:
    """The model's identity for the key: a directory's files (name, size, mtime), else the hub id."""
    path = Path(model_name).expanduser()
    if not path.is_dir():
        return {"id": model_name}
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name != "fasp.json")
    return {"dir": str(path.resolve()), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


class Checkpoint:
    """The checkpoint directory of one prune; ``key`` (JSON-ready) identifies the command.

    Example:
        >>> import tempfile
        >>> ckpt = Checkpoint(Path(tempfile.mkdtemp()) / ".x.resume", {"sparsity": 0.3})
        >>> ckpt.check(); ckpt.state() is None
        True
    """

    def __init__(self, directory: str | Path, key: dict):
        self.directory, self.key = Path(directory), json.loads(json.dumps(key, default=str))

    def state(self) -> dict | None:
        """The saved state, None when there is no checkpoint."""
        path = self.directory / STATE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UsageError(f"the checkpoint {path} is damaged ({err}); remove {self.directory}") from None

    def check(self) -> None:
        """UsageError when the checkpoint was made by another command (cheap: before any work)."""
        state = self.state()
        if state is None or state.get("key") == self.key:
            return
        saved = state.get("key", {})
        differ = sorted(k for k in set(saved) | set(self.key) if saved.get(k) != self.key.get(k))
        raise UsageError(f"the checkpoint in {self.directory} was made by another command (it differs in "
                         f"{', '.join(differ)}): run that command again, or remove {self.directory} to start over")

    def save(self, done: int, layer: nn.Module, stream_hidden: list[torch.Tensor], extra: dict) -> None:
        """Record that ``done`` layers are pruned: layer ``done - 1``, the stream entering layer ``done``,
        and ``extra`` (the report so far, the walk's decisions). state.json is replaced last, so a
        checkpoint interrupted while saving still describes what is on disk."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in layer.state_dict().items()}
        _save(tensors, self.directory / f"layer-{done - 1:04d}.safetensors")
        _save({str(j): h.detach().cpu().contiguous() for j, h in enumerate(stream_hidden)},
              self.directory / "stream.safetensors")
        tmp = self.directory / f"{STATE}.tmp"
        tmp.write_text(json.dumps({"key": self.key, "done": done, **extra}, indent=1, default=str) + "\n")
        os.replace(tmp, self.directory / STATE)

    def load(self, layers: nn.ModuleList, stream_hidden: list[torch.Tensor]) -> dict:
        """Put the saved layers into ``layers`` and the saved stream into ``stream_hidden`` (in place,
        each where its current tensor is); return the state."""
        state = self.state()
        for i in range(state["done"]):
            load_layer(layers[i], load_file(self.directory / f"layer-{i:04d}.safetensors"))
        saved = load_file(self.directory / "stream.safetensors")
        if len(saved) != len(stream_hidden):
            raise UsageError(f"the checkpoint in {self.directory} holds {len(saved)} calibration samples, not "
                             f"{len(stream_hidden)}: remove it to start over")
        for j, h in enumerate(stream_hidden):
            stream_hidden[j] = saved[str(j)].to(device=h.device, dtype=h.dtype)
        return state

    def remove(self) -> None:
        """Drop the checkpoint (the output it was for is complete)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def load_layer(layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give ``layer`` the saved tensors, shapes included (a pruned FFN is narrower than the dense one)."""
    for name, tensor in tensors.items():
        module_name, _, attr = name.rpartition(".")
        module = layer.get_submodule(module_name) if module_name else layer
        current = getattr(module, attr)
        value = tensor.to(device=current.device, dtype=current.dtype)
        if isinstance(current, nn.Parameter):
            setattr(module, attr, nn.Parameter(value, requires_grad=current.requires_grad))
        else:
            module._buffers[attr] = value
        if isinstance(module, nn.Linear) and attr == "weight":
            module.out_features, module.in_features = value.shape
