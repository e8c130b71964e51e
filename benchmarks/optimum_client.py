"""Optimum's ORTModelForCausalLM on a faspx ONNX export, from faspx: in Optimum's own environment.

optimum-onnx 0.1 pins transformers < 4.58 (faspx runs 5.x), so ``make optimum`` makes ``.venv-optimum``
and faspx runs ``optimum_generate.py`` with its Python (``FASPX_OPTIMUM_PYTHON`` names another).

Example:
    >>> optimum_greedy("out/onnx", [[1, 2, 3]], 8)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from faspx.errors import FaspxError

OPTIMUM_ENV = ".venv-optimum"
SCRIPT = Path(__file__).with_name("optimum_generate.py")


def optimum_python() -> Path | None:
    """The Python of the environment Optimum is installed in, None where there is none."""
    named = os.environ.get("FASPX_OPTIMUM_PYTHON")
    if named:
        return Path(named) if Path(named).exists() else None
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        python = root / OPTIMUM_ENV / "bin" / "python"
        if python.exists():
            return python
    return None


def optimum_greedy(onnx_dir: str | Path, prompts: list[list[int]], new_tokens: int,
                   timeout: float = 600) -> list[list[int]]:
    """Greedy continuations (``new_tokens`` each, no stop at end-of-sequence) in ORTModelForCausalLM."""
    python = optimum_python()
    if python is None:
        raise FaspxError(f"no Optimum environment: run `make optimum` ({OPTIMUM_ENV}), or set FASPX_OPTIMUM_PYTHON")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([list(map(int, p)) for p in prompts], f)
    try:
        done = subprocess.run([str(python), str(SCRIPT), str(onnx_dir), f.name, str(new_tokens)],
                              capture_output=True, text=True, timeout=timeout)
    finally:
        Path(f.name).unlink(missing_ok=True)
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise FaspxError(f"Optimum failed on {onnx_dir} (exit {done.returncode}): {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])
