"""Atomic output directories and the provenance file every faspx output carries."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
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


def provenance(**fields) -> dict:
    """The common head of fasp.json: faspx version and UTC time, then the given fields."""
    from faspx import __version__

    return {"faspx_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
