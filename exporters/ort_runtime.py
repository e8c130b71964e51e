"""Run an exported ONNX decoder in onnxruntime: prefill, decode steps, greedy generation.

``OnnxDecoder`` reads a directory written by ``exporters.export_onnx`` (``model.onnx`` with the HF
Optimum decoder signature, ``config.json``, ``generation_config.json``, tokenizer files). The KV
cache stays in onnxruntime ``OrtValue``s between steps (on the GPU with the CUDA provider), so a
benchmark can time ``prefill`` and ``decode_step`` separately.

Example:
    >>> dec = OnnxDecoder("out/onnx")  # doctest: +SKIP
    >>> dec.generate_text(["The capital of France is"], max_new_tokens=8)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from faspx.errors import UsageError
from faspx.exporters.files import require_model_dir

log = logging.getLogger("faspx")

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def positions(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Position ids of the last ``new_tokens`` tokens from a left-padded mask (as transformers' generate)."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    pos = np.cumsum(mask, axis=-1) - 1
    pos[mask == 0] = 0
    return np.ascontiguousarray(pos[:, mask.shape[1] - new_tokens:])


def select_providers(device: str = "auto") -> tuple[list, str]:
    """onnxruntime providers and the device type ('cpu' or 'cuda') for ``device`` (auto, cpu, cuda[:N])."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device in (None, "auto"):
        device = "cuda" if has_cuda else "cpu"
    if device == "cpu":
        return ["CPUExecutionProvider"], "cpu"
    if device.startswith("cuda"):
        if not has_cuda:
            raise UsageError(
                "--device cuda was asked for but onnxruntime has no CUDAExecutionProvider (install "
                "onnxruntime-gpu in place of onnxruntime, or use --device cpu)"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], f"cuda:{index}"
    raise UsageError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")


def check_prompt_tokens(prompts: list[str], length: int) -> None:
    """UsageError when the prompts tokenize to nothing (an empty prompt, a tokenizer that adds no BOS)."""
    if length == 0:
        raise UsageError(f"the prompt{'s' if len(prompts) > 1 else ''} {prompts!r} tokenize to no token (this "
                         "tokenizer adds no BOS token): give some prompt text")


def left_padded(mask: np.ndarray) -> bool:
    """Whether some row of an attention mask has padding before a token (a 0 before a 1).

    Example:
        >>> left_padded(np.array([[1, 1, 0]])), left_padded(np.array([[0, 1, 1]]))
        (False, True)
    """
    return bool((np.diff(np.asarray(mask), axis=1) > 0).any())


class OnnxDecoder:
    """A decoder-only ONNX graph with KV cache, run by onnxruntime; greedy generation with left padding.

    ``past`` values passed between ``prefill`` and ``decode_step`` are lists of ``OrtValue``s in the
    graph's order (``past_key_values.0.key``, ``past_key_values.0.value``, ``past_key_values.1.key``, ...).
    """

    def __init__(self, model_dir: str | Path, device: str = "auto", session_options=None):
        import onnxruntime as ort

        self.model_dir = require_model_dir(model_dir, need=("model.onnx",))
        providers, device = select_providers(device)
        self.device_type, _, index = device.partition(":")
        self.device_id = int(index or 0)
        try:
            self.session = ort.InferenceSession(str(self.model_dir / "model.onnx"), sess_options=session_options,
                                                providers=providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for a damaged file
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UsageError(f"{self.model_dir / 'model.onnx'} could not be loaded by onnxruntime ({first}): is it "
                             "complete (model.onnx_data beside it, if it has one)? export it again") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        for name in ("input_ids", "attention_mask", "past_key_values.0.key"):
            if name not in inputs:
                raise UsageError(f"{self.model_dir / 'model.onnx'} is not a decoder with KV cache: no input {name}")
        self.has_position_ids = "position_ids" in inputs
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        key = inputs["past_key_values.0.key"]
        self.kv_heads, self.head_dim = int(key.shape[1]), self._head_dim(key.shape[3])
        self.kv_dtype = ORT_DTYPES[key.type]
        self.eos_token_ids, self.pad_token_id = self._special_ids()
        from faspx.exporters.builder import is_builder_graph

        self.builder = is_builder_graph(self.model_dir)  # fused attention: one row's mask must be all ones
        self._tokenizer = None

    def _head_dim(self, dim) -> int:
        """The cache's head size: fixed in faspx's graphs, a named dimension in onnxruntime-genai's
        builder (``kv_cache_dim``), then read from config.json."""
        if isinstance(dim, int):
            return dim
        config = json.loads((self.model_dir / "config.json").read_text())
        return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]

    def _special_ids(self) -> tuple[list[int], int | None]:
        data: dict = {}
        for name in ("config.json", "generation_config.json"):  # the generation config wins
            path = self.model_dir / name
            if path.exists():
                data.update({k: v for k, v in json.loads(path.read_text()).items() if v is not None})
        eos = data.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return eos, data.get("pad_token_id")

    @property
    def tokenizer(self):
        """The exported tokenizer, padding on the left (with eos as pad when it has no pad token)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.model_dir)
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            self._tokenizer = tok
        return self._tokenizer

    def empty_past(self, batch: int) -> list:
        """Past tensors of length 0: what ``prefill`` feeds the graph."""
        import onnxruntime as ort

        zeros = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        return [ort.OrtValue.ortvalue_from_numpy(zeros, self.device_type, self.device_id) for _ in self.past_names]

    def forward(self, input_ids, attention_mask, position_ids, past: list) -> tuple[np.ndarray, list]:
        """One run of the graph: logits (numpy, on the host) and the present KV (OrtValues on the device)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        if self.has_position_ids:
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        for name, value in zip(self.past_names, past, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device_type, self.device_id)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), list(outputs[1:])

    def prefill(self, input_ids, attention_mask=None) -> tuple[np.ndarray, list]:
        """Run the prompt (batch x length, left-padded) from an empty cache: (logits, past)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        if self.builder and left_padded(attention_mask):  # generate() runs such rows one by one
            raise UsageError(f"{self.model_dir} was written by onnxruntime-genai's builder, whose fused attention "
                             "reads the mask as per-row lengths: pad on the right, or run the rows one by one")
        pos = positions(attention_mask, input_ids.shape[1])
        return self.forward(input_ids, attention_mask, pos, self.empty_past(input_ids.shape[0]))

    def decode_step(self, input_ids, attention_mask, past: list) -> tuple[np.ndarray, list]:
        """Feed new tokens (batch x k, usually k = 1) on top of ``past``; ``attention_mask`` covers past + new."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim == 1:
            input_ids = input_ids[:, None]
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        return self.forward(input_ids, attention_mask, positions(attention_mask, input_ids.shape[1]), past)

    @staticmethod
    def past_to_numpy(past: list) -> list[np.ndarray]:
        """The KV cache as numpy arrays (copied to the host)."""
        return [value.numpy() for value in past]

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> np.ndarray:
        """Greedy decoding with KV cache; returns prompt + new tokens (batch x (length + n)).

        Matches ``model.generate(do_sample=False)``: a sequence that produced an eos token is padded
        with ``pad_token_id`` (eos when there is none) and decoding stops once every sequence has ended.
        End tokens default to those of ``generation_config.json``.
        """
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        eos = self.eos_token_ids if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) \
            else list(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else self.pad_token_id
        if pad is None and eos:
            pad = eos[0]
        tokens = [input_ids]
        done = np.zeros(input_ids.shape[0], dtype=bool)
        if max_new_tokens <= 0:
            return input_ids
        if self.builder and not mask.all():  # fused attention: no padded cache, so one row at a time
            return self._generate_rows(input_ids, mask, max_new_tokens, eos, pad)
        logits, past = self.prefill(input_ids, mask)
        for step in range(max_new_tokens):
            nxt = logits[:, -1, :].argmax(-1).astype(np.int64)
            if eos:
                nxt = np.where(done, pad, nxt)
                done |= np.isin(nxt, eos)
            tokens.append(nxt[:, None])
            if done.all() or step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
            logits, past = self.decode_step(nxt[:, None], mask, past)
        return np.concatenate(tokens, axis=1)

    def _generate_rows(self, input_ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, eos: list[int],
                       pad: int | None) -> np.ndarray:
        """``generate`` of a padded batch, row by row on each row's tokens: the batch's result (a row
        that ended early padded with ``pad``, as a batch would have)."""
        new = [self.generate(ids[m.astype(bool)], None, max_new_tokens, eos, pad)[0, int(m.sum()):]
               for ids, m in zip(input_ids, mask, strict=True)]
        out = np.full((len(new), max(len(n) for n in new)), pad if pad is not None else 0, dtype=np.int64)
        for row, tokens in zip(out, new, strict=True):
            row[:len(tokens)] = tokens
        return np.concatenate([input_ids, out], axis=1)

    def generate_text(self, prompts: str | list[str], max_new_tokens: int = 32) -> list[str]:
        """Tokenize (left padding), generate greedily, and decode only the new tokens."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        enc = self.tokenizer(prompts, return_tensors="np", padding=True)
        check_prompt_tokens(prompts, enc["input_ids"].shape[1])
        out = self.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                            pad_token_id=self.tokenizer.pad_token_id if self.pad_token_id is None else None)
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
