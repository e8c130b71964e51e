"""The runtimes a deployer would use, each timing one greedy generation with its KV cache.

A runner loads one model variant and returns a ``Sample`` per call; ``unavailable(backend, device)``
says why a backend cannot run here (reported as skipped, never faked).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.timing import Sample, time_generation

BACKENDS = ("torch", "onnxruntime", "vllm")


def unavailable(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device`` here, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "onnxruntime":
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed"
        if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDA provider (install the gpu extra: onnxruntime-gpu)"
        return None
    if backend == "vllm":
        if device.type != "cuda":
            return "vLLM needs a CUDA GPU and this run has none"
        try:
            import vllm  # noqa: F401
        except ImportError:
            return "vllm is not installed"
        return None
    return f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})"


class TorchRunner:
    """PyTorch eager with the transformers KV cache (fp32 on the CPU, bf16 on CUDA)."""

    def __init__(self, model_dir: Path, device: torch.device):
        from transformers import AutoModelForCausalLM

        self.device = device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.kv_bytes_per_value = torch.finfo(dtype).bits // 8

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def sample(self, ids: np.ndarray, new_tokens: int, clock: Callable[[], float] = time.perf_counter) -> Sample:
        prompt = torch.from_numpy(ids).to(self.device)

        def run(tokens, past):
            out = self.model(input_ids=tokens, past_key_values=past, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            self._sync()
            return nxt, out.past_key_values

        with torch.inference_mode():
            return time_generation(lambda: run(prompt, None), lambda state: run(*state), new_tokens, clock)


class OrtRunner:
    """onnxruntime on the exported graph (CPU provider, or CUDA with onnxruntime-gpu)."""

    def __init__(self, onnx_dir: Path, device: torch.device):
        from exporters.ort_runtime import OnnxDecoder

        self.decoder = OnnxDecoder(onnx_dir, device="cuda" if device.type == "cuda" else "cpu")
        self.kv_bytes_per_value = np.dtype(self.decoder.kv_dtype).itemsize

    def sample(self, ids: np.ndarray, new_tokens: int, clock: Callable[[], float] = time.perf_counter) -> Sample:
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

        return time_generation(prefill, step, new_tokens, clock)


class VllmRunner:
    """vLLM offline engine. Its API returns whole generations, so the first token's time is a
    max_tokens=1 generation and the per-token decode time is the rest, divided evenly."""

    def __init__(self, model_dir: Path, device: torch.device):
        from vllm import LLM

        self.llm = LLM(model=str(model_dir), dtype="bfloat16", enforce_eager=False)
        self.kv_bytes_per_value = 2

    def sample(self, ids: np.ndarray, new_tokens: int, clock: Callable[[], float] = time.perf_counter) -> Sample:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in ids]

        def generate(n: int) -> float:
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            start = clock()
            self.llm.generate(prompts, params, use_tqdm=False)
            return clock() - start

        first = generate(1)
        rest = generate(new_tokens) - first
        return Sample(prefill_s=first, step_s=[rest / (new_tokens - 1)] * (new_tokens - 1))


RUNNERS = {"torch": TorchRunner, "onnxruntime": OrtRunner, "vllm": VllmRunner}
