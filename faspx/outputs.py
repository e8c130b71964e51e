"""Atomic output directories and the provenance file every faspx output carries.

An output is written into a hidden sibling temporary directory (``.OUT.tmp-*``) and renamed to OUT
only when complete. The temporary directory holds a lock file, locked (``flock``) for as long as the
writing process lives: the kernel releases it whatever ends the process (SIGKILL included), so a
later run of the same output can tell a stale temporary directory from one being written, remove
the stale one and say so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from faspx.errors import UsageError

log = logging.getLogger("faspx")
LOCK_FILE = ".faspx-writing"
# A temporary directory without a lock file is stale once this old (its process died before locking it).
UNLOCKED_GRACE_S = 60.0
# Outputs completed by this process, in order (what an interruption message reports as written).
WRITTEN: list[Path] = []


def check_out(out: str | Path, force: bool) -> Path:
    """Fail early (before any work) unless ``out`` can be written: UsageError when it exists and
    ``force`` is off, when it is the working directory or holds it, or when its directory is not
    writable. Stale temporary directories of ``out`` (their process gone) are removed here.

    Example:
        >>> check_out(tempfile.mkdtemp() + "/new", force=False).name
        'new'
    """
    out = Path(os.path.abspath(Path(out).expanduser()))  # "." and ".." resolved: they have no name
    cwd = Path(os.getcwd())
    if out == cwd or out in cwd.parents or out == Path(os.path.abspath(Path.home())):
        raise UsageError(f"--out {out} is the working directory, the home directory or holds one: "
                         "choose a new directory for the output")
    if out.exists() and not force:
        raise UsageError(f"output {out} already exists; pass --force to replace it")
    check_writable(out.parent)
    clean_stale(out)
    return out


def check_writable(directory: str | Path) -> None:
    """UsageError unless files can be created in ``directory`` (or its nearest existing parent).

    The check creates and removes a probe directory: ``os.access`` says yes to root on a read-only
    file system.
    """
    probe = Path(directory).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot write under {directory}: {probe} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".faspx-probe-", dir=probe))
    except OSError as err:
        raise UsageError(f"cannot write under {directory}: {err.strerror} ({probe}); choose another --out") from None


def check_file_out(path: str | Path, force: bool = True) -> Path:
    """A result file (``--json``): UsageError before any work unless it can be written.

    Example:
        >>> check_file_out(tempfile.mkdtemp() + "/r.json").name
        'r.json'
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a file name")
    if path.exists() and not force:
        raise UsageError(f"{path} already exists; pass --force to replace it")
    if not path.parent.is_dir():
        raise UsageError(f"the directory of {path} does not exist; create it first")
    check_writable(path.parent)
    return path


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _owner(directory: Path) -> dict:
    """Who wrote a temporary directory, from its lock file ({} when unreadable)."""
    try:
        return json.loads((directory / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _is_locked(lock: Path) -> bool:
    """True while the process that locked ``lock`` lives."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def clean_stale(out: Path) -> list[Path]:
    """Remove the temporary directories of ``out`` that interrupted runs left (``.OUT.tmp-*``,
    ``.OUT.old-PID``) once their process is gone; UsageError while another process is writing ``out``.
    Returns what was removed."""
    if not out.parent.is_dir():
        return []
    removed = []
    for path in sorted(out.parent.iterdir()):
        name = path.name
        if name.startswith(f".{out.name}.tmp-") and path.is_dir():
            lock = path / LOCK_FILE
            if lock.exists():
                if _is_locked(lock):
                    who = _owner(path)
                    raise UsageError(f"another faspx process (pid {who.get('pid', '?')}) is writing {out} now "
                                     f"(into {path}); wait for it, or choose another --out")
            elif time.time() - path.stat().st_mtime < UNLOCKED_GRACE_S:
                continue
        elif name.startswith(f".{out.name}.old-"):
            pid = name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
                continue
        else:
            continue
        who = _owner(path) if path.is_dir() else {}
        _remove(path)
        removed.append(path)
        log.warning("removed %s, left by an interrupted faspx run%s", path,
                    f" (pid {who['pid']}, started {who.get('started', '?')})" if who.get("pid") else "")
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything in it the permissions the umask gives new files (``mkdtemp`` makes
    0700 and some writers 0600: a server running as another user could not read the output)."""
    mask = _umask()
    for directory, _dirs, files in os.walk(root):
        os.chmod(directory, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``out`` only when the block succeeds.

    On any exception (Ctrl-C and the signals the CLI turns into one included) the temporary
    directory is removed and ``out`` is untouched; after a SIGKILL, the next run removes it
    (``clean_stale``). The finished output gets the umask's permissions.

    Example:
        >>> with atomic_dir(tempfile.mkdtemp() + "/result") as tmp:
        ...     _ = (tmp / "a.txt").write_text("done")
    """
    out = check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    lock = os.open(tmp / LOCK_FILE, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.write(lock, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                   "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
        yield tmp
        (tmp / LOCK_FILE).unlink()
        apply_umask(tmp)
        if out.exists() or out.is_symlink():
            if not force:
                raise UsageError(f"output {out} appeared while it was being written; pass --force to replace it")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            _remove(old)
        else:
            tmp.rename(out)
        WRITTEN.append(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def write_json(path: Path, data: dict) -> None:
    """JSON with a trailing newline, indented for people."""
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


@dataclass
class FaspInfo:
    """``fasp.json``, the provenance every faspx output carries: written and read by this class alone.

    ``form`` is decided once, from the prune's result: ``stock`` (stock transformers classes load it),
    ``nemotron-nas`` (per-layer FFN widths) or ``dense`` (an unpruned source exported as it is);
    loaders and exporters dispatch on it. ``recipe`` is the resolved recipe (``--recipe fasp.json``
    reads it back), ``prune`` the PruneReport, ``distill`` the DistillReport, ``eval`` perplexity and
    ``zeroshot`` task accuracy (dense and pruned) when the build measured them.

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
    zeroshot: dict | None = None

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
