"""The runtimes a deployer would use, each timing one greedy generation with its KV cache.

A runner loads one model variant and returns a ``Sample`` per call; ``unavailable(backend, device)``
says why a backend cannot run here (reported as skipped, never faked). Every runner exposes
``device`` (where it really runs), ``dtype``, ``kv_bytes_per_value`` and ``weight_bytes`` (the
weights it holds).
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from faspx.benchmarks.timing import Sample, time_generation
from faspx.exporters.files import weight_file_bytes
from faspx.models import cache_keyword, returned_cache

BACKENDS = ("torch", "onnxruntime", "genai", "vllm")


def unavailable(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device`` here, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu)"
        return None
    if backend == "genai":
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:
            return "onnxruntime-genai is not installed (pip install faspx[genai])"
        return None
    if backend == "vllm":
        from faspx.benchmarks.vllm_client import unavailable_reason

        return unavailable_reason()
    return f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})"


def ort_device(device: torch.device) -> tuple[str, str | None]:
    """Where onnxruntime runs for a run on ``device``: CUDA when asked and onnxruntime-gpu has the CUDA
    provider, else the CPU, with a note saying why."""
    import onnxruntime as ort

    if device.type != "cuda":
        return "cpu", None
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return f"cuda:{device.index or 0}", None
    return "cpu", ("onnxruntime ran on the CPU: it has no CUDAExecutionProvider here (install onnxruntime-gpu "
                   "in place of onnxruntime for the GPU)")


class TorchRunner:
    """PyTorch eager with the transformers KV cache (fp32 on the CPU, bf16 on CUDA), greedy decoding.

    Only the last position's logits are computed (``logits_to_keep=1``, as ``generate`` does), and on
    CUDA every call synchronises before its time is taken.
    """

    def __init__(self, model_dir: Path, device: torch.device):
        from faspx.models import load_hf

        self.device = str(device)
        self._device = device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.dtype = str(dtype).removeprefix("torch.")
        self.model = load_hf(model_dir, dtype=dtype).to(device)
        self.kv_bytes_per_value = dtype.itemsize
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self._cache_keyword = cache_keyword(self.model)
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters \
            else {}

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def sample(self, ids: np.ndarray, new_tokens: int, clock: Callable[[], float] = time.perf_counter,
               at_end: Callable[[object], None] | None = None) -> Sample:
        prompt = torch.from_numpy(ids).to(self._device)

        def run(tokens, past):
            out = self.model(input_ids=tokens, use_cache=True, **{self._cache_keyword: past}, **self._extra)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            self._sync()
            return nxt, returned_cache(out)

        with torch.inference_mode():
            return time_generation(lambda: run(prompt, None), lambda state: run(*state), new_tokens, clock, at_end)


class OrtRunner:
    """onnxruntime on the exported graph (``faspx.exporters.ort_runtime.OnnxDecoder``): the CPU provider, or
    CUDA with onnxruntime-gpu. The KV cache stays in onnxruntime between steps; logits come to the host."""

    def __init__(self, onnx_dir: Path, device: str):
        from faspx.exporters.ort_runtime import OnnxDecoder

        self.device = device
        self.decoder = OnnxDecoder(onnx_dir, device=device)
        self.dtype = np.dtype(self.decoder.kv_dtype).name
        self.kv_bytes_per_value = np.dtype(self.decoder.kv_dtype).itemsize
        self.weight_bytes = weight_file_bytes(onnx_dir)  # graph + external data: the initializers

    def sample(self, ids: np.ndarray, new_tokens: int, clock: Callable[[], float] = time.perf_counter,
               at_end: Callable[[object], None] | None = None) -> Sample:
        ones = np.ones((ids.shape[0], 1), dtype=np.int64)

        def prefill():
            mask = np.ones_like(ids)
            logits, past = self.decoder.prefill(ids, mask)
            return logits[:, -1].argmax(-1), past, mask

        def step(state):
            nxt, past, mask = state
            mask = np.concatenate([mask, ones], axis=1)
            logits, past = self.decoder.decode_step(nxt[:, None], mask, past)
            return logits[:, -1].argmax(-1), past, mask

        return time_generation(prefill, step, new_tokens, clock, at_end)


class GenaiRunner:
    """onnxruntime-genai on the exported graph and its genai_config.json (CPU): its own generation loop
    and KV handling, as an edge deployment runs the model. The time to first token is
    ``append_tokens`` of the prompt plus the first ``generate_next_token``; each decode step is one
    ``generate_next_token``."""

    def __init__(self, onnx_dir: Path, device: str):
        import onnxruntime_genai as og

        from faspx.errors import UsageError

        if not (Path(onnx_dir) / "genai_config.json").exists():
            raise UsageError(f"{onnx_dir} has no genai_config.json: export it again with this faspx (an OPT export "
                             "has none: onnxruntime-genai has no OPT model type)")
        self.og, self.model = og, og.Model(str(onnx_dir))
        self.device = f"cpu (onnxruntime-genai {og.__version__})"
        config = json.loads((Path(onnx_dir) / "config.json").read_text())
        self.dtype = config.get("dtype", "float32")
        self.kv_bytes_per_value = 2 if self.dtype == "float16" else 4
        self.weight_bytes = weight_file_bytes(onnx_dir)

    def sample(self, ids: np.ndarray, new_tokens: int, clock: Callable[[], float] = time.perf_counter,
               at_end: Callable[[object], None] | None = None) -> Sample:
        params = self.og.GeneratorParams(self.model)
        length = ids.shape[1] + new_tokens
        params.set_search_options(do_sample=False, batch_size=ids.shape[0], max_length=length, min_length=length)
        generator = self.og.Generator(self.model, params)

        def prefill():
            generator.append_tokens(ids)
            generator.generate_next_token()
            return generator

        def step(state):
            state.generate_next_token()
            return state

        return time_generation(prefill, step, new_tokens, clock, at_end)


class VllmRunner:
    """vLLM's offline engine, in its own environment (``faspx.benchmarks.vllm_client``): float32 on the
    CPU (as the other CPU runners), bfloat16 on CUDA. Its API returns whole generations, so the time to
    first token is a ``max_tokens=1`` generation and each decode step is the rest of a full generation
    divided evenly: its per-token latency is a mean, not a distribution (p90 = median). Timings are
    taken in the worker, around ``LLM.generate``; memory where vLLM holds it (its processes' RSS, and
    the KV pool it reserved)."""

    def __init__(self, model_dir: Path, device: torch.device, max_len: int):
        from faspx.benchmarks.memory import kv_cache_bytes
        from faspx.benchmarks.vllm_client import VllmEngine
        from faspx.models import hf_config, meta_model

        self.dtype = "bfloat16" if device.type == "cuda" else "float32"
        self.kv_bytes_per_value = 2 if self.dtype == "bfloat16" else 4
        config = hf_config(model_dir)  # a nemotron-nas config: faspx's code files checked before vLLM runs them
        self.engine = VllmEngine(model_dir, max_len=max_len, dtype=self.dtype, device=str(device),
                                 trust_remote_code=config.model_type == "nemotron-nas")
        self.device = f"{self.engine.device} (vLLM {self.engine.info.get('vllm', '?')})"
        self.weight_bytes = sum(p.numel() for p in meta_model(config).parameters()) * self.kv_bytes_per_value
        self.kv_pool_bytes = kv_cache_bytes(config, 1, self.engine.info["kv_cache_tokens"], self.kv_bytes_per_value)

    def held_memory(self) -> dict:
        """What vLLM holds, measured in its processes: their RSS now, and its reserved KV pool."""
        return {"vllm_rss_bytes": self.engine.memory()["rss_bytes"], "vllm_kv_pool_bytes": self.kv_pool_bytes,
                "vllm_startup_s": self.engine.info["startup_s"]}

    def sample(self, ids: np.ndarray, new_tokens: int, clock: Callable[[], float] = time.perf_counter,
               at_end: Callable[[object], None] | None = None) -> Sample:
        first, total = self.engine.time(ids.tolist(), new_tokens)
        rest = total - first
        if rest <= 0:
            raise RuntimeError(f"vLLM generated {new_tokens} tokens no slower than 1 token: too few --new-tokens "
                               "to time its decode this way")
        if at_end is not None:
            at_end(None)
        return Sample(prefill_s=first, step_s=[rest / (new_tokens - 1)] * (new_tokens - 1))

    def close(self) -> None:
        """Stop the engine."""
        self.engine.close()


def load_runner(backend: str, source: Path, device: torch.device | str, max_len: int):
    """The runner of ``backend`` for one variant (``source``: HF directory, or ONNX directory for onnxruntime)."""
    if backend == "torch":
        return TorchRunner(source, device)
    if backend == "onnxruntime":
        return OrtRunner(source, device)
    if backend == "genai":
        return GenaiRunner(source, device)
    if backend == "vllm":
        return VllmRunner(source, device, max_len)
    raise ValueError(f"unknown backend {backend!r}")
