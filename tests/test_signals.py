"""Every way a run can stop: SIGTERM and SIGHUP clean up like Ctrl-C, a SIGKILL's leftovers are removed by
the next run, and an interruption says truthfully what was written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from faspx.cli import main
from tests.conftest import save_tiny


@pytest.fixture
def model_dir(tmp_path, opt_tokenizer):
    return save_tiny("llama", tmp_path / "dense", opt_tokenizer)


def build_args(model_dir, text_file, out, *extra):
    return ["build", "--model", str(model_dir), "--sparsity", "0.3", "--calib", str(text_file), "--nsamples", "4",
            "--seqlen", "64", "--recipe", "paper", "--out", str(out), "-q", *extra]


def start_and_wait_for_partial_weights(args, parent, timeout=120):
    """Start faspx in a child process; return it once its temporary output holds weights (mid-export)."""
    child = subprocess.Popen([sys.executable, "-m", "faspx.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             # a crash of the child (once: SIGSEGV after SIGTERM in CI) prints its stack
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(parent.glob(".out.tmp-*/hf/model.safetensors")):
            return child
        if child.poll() is not None:
            raise AssertionError(f"faspx ended before writing (exit {child.returncode}): {child.stderr.read()}")
        time.sleep(0.05)
    child.kill()
    raise AssertionError("no partial output appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_remove_the_partial_output(model_dir, text_file, tmp_path, sig):
    before = sorted(p.name for p in tmp_path.iterdir())
    child = start_and_wait_for_partial_weights(build_args(model_dir, text_file, tmp_path / "out"), tmp_path)
    child.send_signal(sig)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 1, stderr
    assert f"interrupted ({sig.name}); nothing was written" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no .out.tmp-*, no out


def test_after_a_sigkill_the_next_run_removes_the_leftovers_and_says_so(model_dir, text_file, tmp_path):
    child = start_and_wait_for_partial_weights(build_args(model_dir, text_file, tmp_path / "out"), tmp_path)
    child.kill()
    child.communicate(timeout=60)
    (left,) = tmp_path.glob(".out.tmp-*")
    result = CliRunner().invoke(main, build_args(model_dir, text_file, tmp_path / "out", "--target", "hf"))
    assert result.exit_code == 0, result.output
    assert f"removed {left}" in result.output and f"pid {child.pid}" in result.output
    assert not left.exists() and (tmp_path / "out" / "hf" / "model.safetensors").exists()


def test_an_interrupted_benchmark_keeps_the_finished_build_and_says_so(model_dir, text_file, tmp_path,
                                                                        monkeypatch):
    import faspx.benchmarks.run

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(faspx.benchmarks.run, "run_bench", interrupted)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, build_args(model_dir, text_file, out, "--target", "hf", "--bench"))
    assert result.exit_code == 1
    assert "nothing was written" not in result.output
    assert f"complete before the interruption: {out}" in result.output
    assert (out / "fasp.json").exists() and not (out / "bench").exists()
