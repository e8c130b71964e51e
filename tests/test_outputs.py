"""Atomic outputs: what --force replaces, stale temporary directories, permissions, result files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from faspx.errors import UsageError
from faspx.outputs import LOCK_FILE, atomic_dir, check_file_out, check_out, clean_stale


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_get_the_umask_permissions_not_mkdtemps(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            os.chmod(tmp / "model.safetensors", 0o600)  # as some writers leave it
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "f").write_text("y")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert mode(out) == 0o755 and mode(out / "sub") == 0o755  # mkdtemp made 0700
    assert mode(out / "model.safetensors") == 0o644 and mode(out / "sub" / "f") == 0o644
    assert not (out / LOCK_FILE).exists()


def test_force_replaces_an_existing_file_and_leaves_no_old_copy(tmp_path):
    (tmp_path / "out").write_text("an old file")
    with atomic_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "a").write_text("new")
    assert (tmp_path / "out" / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", [".", "..", "~"])
def test_force_refuses_the_working_or_home_directory_before_any_work(tmp_path, monkeypatch, where):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UsageError, match="working directory"):
        check_out(where if where != "~" else "~", force=True)
    assert sorted(p.name for p in work.iterdir()) == []


def test_an_unwritable_place_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        check_out(tmp_path / "file" / "out", force=False)
    if os.geteuid() != 0:  # root writes into a 0555 directory anyway
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(UsageError, match="cannot write"):
            check_out(ro / "out", force=False)


def test_check_file_out(tmp_path):
    assert check_file_out(tmp_path / "r.json") == tmp_path / "r.json"
    with pytest.raises(UsageError, match="does not exist"):
        check_file_out(tmp_path / "no" / "r.json")
    with pytest.raises(UsageError, match="is a directory"):
        check_file_out(tmp_path)


def _writer(tmp_path, out):
    """A child process holding an atomic_dir of ``out`` open until it is killed."""
    code = (f"import time; from faspx.outputs import atomic_dir\n"
            f"with atomic_dir({str(out)!r}) as tmp:\n    print(tmp, flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    tmp = child.stdout.readline().strip()
    assert tmp, "the child wrote no temporary directory"
    return child, tmp


def test_stale_temporary_directories_are_removed_and_live_ones_refused(tmp_path, caplog):
    out = tmp_path / "out"
    child, tmp = _writer(tmp_path, out)
    try:
        with pytest.raises(UsageError, match=f"pid {child.pid}.*is writing"):
            check_out(out, force=False)
    finally:
        child.kill()  # SIGKILL: no cleanup runs in the child
        child.wait()
    assert os.path.isdir(tmp)  # what a SIGKILL leaves
    old = tmp_path / f".out.old-{child.pid}"  # a replaced output whose removal was cut short
    old.mkdir()
    (tmp_path / ".out.tmp-unlocked").mkdir()  # a process killed before it locked: stale once old
    os.utime(tmp_path / ".out.tmp-unlocked", (time.time() - 3600,) * 2)
    (tmp_path / ".other.tmp-x").mkdir()  # another output's: never touched
    with caplog.at_level("WARNING", logger="faspx"):
        check_out(out, force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-x"]
    assert f"pid {child.pid}" in caplog.text and "interrupted faspx run" in caplog.text


def test_a_fresh_unlocked_temporary_directory_is_left_alone(tmp_path):
    (tmp_path / ".out.tmp-new").mkdir()
    assert clean_stale(tmp_path / "out") == []
    assert (tmp_path / ".out.tmp-new").exists()
