"""Atomic output directories and the provenance file every faspx output carries."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from faspx.errors import UsageError


def check_out(out: str | Path, force: bool) -> Path:
    """Fail early (before any work) when ``out`` exists and ``force`` is off."""
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise UsageError(f"output directory {out} already exists; pass --force to replace it")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``out`` only when the block succeeds.

    On any exception (Ctrl-C included) the temporary directory is removed and ``out`` is untouched.

    Example:
        >>> with atomic_dir(tempfile.mkdtemp() + "/result") as tmp:
        ...     _ = (tmp / "a.txt").write_text("done")
    """
    out = check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        check_out(out, force)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_json(path: Path, data: dict) -> None:
    """JSON with a trailing newline, indented for people."""
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


@dataclass
class FaspInfo:
    """``fasp.json``, the provenance every faspx output carries: written and read by this class alone.

    ``form`` is decided once, from the prune's result: ``stock`` (stock transformers classes load it),
    ``nemotron-nas`` (per-layer FFN widths) or ``dense`` (an unpruned source exported as it is);
    loaders and exporters dispatch on it. ``recipe`` is the resolved recipe (``--recipe fasp.json``
    reads it back), ``prune`` the PruneReport, ``distill`` the DistillReport.

    Example:
        >>> info = FaspInfo(source_model="m", form="dense", pruned=False)
        >>> FaspInfo.from_dict(info.to_dict()) == info
        True
    """

    source_model: str
    form: str = "stock"
    pruned: bool = True
    faspx_version: str = ""
    created: str = ""
    revision: str | None = None
    architecture: str | None = None
    model_type: str | None = None
    sparsity: float | None = None
    recipe: dict | None = None
    calibration: dict | None = None
    params: dict | None = None
    prune: dict | None = None
    distill: dict | None = None
    timings: dict = field(default_factory=dict)
    exports: dict = field(default_factory=dict)
    eval: dict | None = None

    def __post_init__(self) -> None:
        if not self.faspx_version:
            from faspx import __version__

            self.faspx_version = __version__
        if not self.created:
            self.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "fasp.json") -> FaspInfo:
        """Read back what ``to_dict`` wrote; a UsageError names a file of another shape."""
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or "source_model" not in data:
            raise UsageError(f"{source} is not a faspx fasp.json (no source_model)")
        unknown = set(data) - known
        if unknown:
            raise UsageError(f"{source} has fields this faspx does not know ({', '.join(sorted(unknown))}): "
                             "it was written by another faspx version; prune again")
        return cls(**data)

    def write(self, path: Path) -> None:
        """Write as ``path`` (normally ``DIR/fasp.json``)."""
        write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: Path) -> FaspInfo:
        """The FaspInfo in ``path``; UsageError if it is not readable JSON of this shape."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UsageError(f"{path} could not be read as JSON: {err}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def of_dir(cls, directory: str | Path) -> FaspInfo | None:
        """The FaspInfo of a model directory, None where it has no fasp.json."""
        path = Path(directory).expanduser() / "fasp.json"
        return cls.read(path) if path.is_file() else None
