"""The ONNX export: one decoder graph with KV cache, HF Optimum's conventions, validated against PyTorch.

Graph signature (Optimum's decoder-with-past layout, the one its ``ORTModelForCausalLM`` reads; optimum
itself is not installed here, so that is checked by names and shapes, and plain onnxruntime runs it)::

    inputs   input_ids            int64  batch_size x sequence_length
             attention_mask       int64  batch_size x (past_sequence_length + sequence_length)
             position_ids         int64  batch_size x sequence_length
             past_key_values.{i}.key / .value   batch_size x kv_heads x past_sequence_length x head_dim
    outputs  logits                      batch_size x sequence_length x vocab
             present.{i}.key / .value    batch_size x kv_heads x (past_sequence_length + sequence_length) x head_dim

Batch, sequence and past lengths are dynamic; one graph serves the prefill (past tensors of length 0)
and every decode step. ``KVDecoder`` wraps the transformers model: it builds a ``DynamicCache`` from the
flat past tensors, calls the model with ``use_cache=True`` and returns logits plus the flat present
tensors. Attention is exported in its ``eager`` form, whatever kernel the model runs in PyTorch: plain
MatMul/Softmax with an explicit additive mask (the dtype's minimum, never -inf), so fully-masked
left-padding rows stay finite by construction and the graph does not depend on how the exporter
translates SDPA. (An sdpa-mode export also validated on the tiny models; it is not used.)

Exporter: the torch.export-based one (``torch.onnx.export(..., dynamo=True)``, onnxscript) is used
by default. In torch 2.13 the TorchScript exporter (``dynamo=False``) is deprecated and slated for
removal; both export OPT, LLaMA (GQA, explicit head_dim), Qwen2 and Mistral (sliding window too)
correctly with transformers 5.23 (max |diff| ~2e-7 on tiny fp32 models), but the dynamo one yields a
smaller, constant-folded graph with named dynamic dimensions, and stores tied embeddings/lm_head
once where the TorchScript graph stores them twice (OPT). Its cost is export time: ~10 s for a
2-layer toy model against <1 s for TorchScript (tracing time grows with the layer count, not the
width). The TorchScript exporter is kept as ``exporter="torchscript"`` and as the fallback of
``exporter="auto"`` (the default) when the dynamo export raises; the result says which one ran and
``validate_onnx`` checks either. Past length 0 needs no special case: torch.export traces with
example sizes >= 2 (it specializes sizes 0 and 1), and the traced graph only ever uses the past
length symbolically (Concat of a zero-length past, Range over the total length), which onnxruntime
runs at 0; the tests run prefill from zero-length past tensors.

Weights above ~2 GB go to one external data file, ``model.onnx_data``, beside ``model.onnx``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from faspx.adapters import attention_shape
from faspx.errors import FaspxError, UsageError
from faspx.exporters.files import SIDE_FILES_BYTES, check_disk, dir_summary, write_config, write_side_files
from faspx.exporters.genai import write_genai_config
from faspx.models import cache_keyword, returned_cache
from faspx.outputs import FaspInfo
from faspx.progress import steps

log = logging.getLogger("faspx")

DEFAULT_OPSET = 18
# The dynamo exporter writes opset 18 at least (asked for less, it writes 18); the TorchScript one
# writes what it is asked for, down to MIN_OPSET.
DYNAMO_MIN_OPSET = 18
MIN_OPSET = 14
EXPORTERS = ("auto", "dynamo", "torchscript")  # and onnxruntime-genai's builder: exporters/builder.py
# The protobuf limit is 2 GiB for the whole file; keep headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
EXTERNAL_DATA_FILE = "model.onnx_data"
# Default bounds of validate_onnx on max |logits(ONNX) - logits(PyTorch)|. fp32 graphs match PyTorch
# to ~1e-6 on small models and ~1e-4 on billion-parameter ones (summation order); fp16 graphs are
# compared with the model as given (usually fp32) and carry fp16 rounding.
ATOL_FP32 = 1e-3
ATOL_FP16 = 1e-1
# Example sizes for tracing: all >= 2 and distinct, so no dimension is specialized or unified.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 4


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Optimum's input and output names for a decoder with ``num_layers`` layers."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def kv_layout(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder config; kv heads < heads with grouped-query attention."""
    config = config.get_text_config(decoder=True)
    _, kv_heads, head_dim = attention_shape(config)
    return config.num_hidden_layers, kv_heads, head_dim


def kv_layers(model: nn.Module) -> list[int]:
    """The decoder layers that have a KV cache: all but those whose attention was removed (2SSP). The
    graph's ``past_key_values.{j}`` / ``present.{j}`` belong to the j-th of them."""
    from faspx.adapters import adapter_for
    from faspx.depth import attention_layers

    return [i for i, has in enumerate(attention_layers(model, adapter_for(model.config))) if has]


class KVDecoder(nn.Module):
    """Flat tensors in and out around a transformers causal LM: the signature the ONNX graph gets.

    Layers without attention have no cache tensors in the graph: inside, they get the one-value-per-
    token placeholders that ``NoAttention`` keeps (so the cache still counts the tokens seen)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.cache_keyword = cache_keyword(model)
        self.kv_layers = kv_layers(model)
        self.n_layers = model.config.get_text_config(decoder=True).num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        # Plain full-attention layers, also for sliding-window configs: the model's own sliding mask
        # then restricts attention, so the graph stays exact beyond the window (the cache just keeps
        # every position instead of dropping old ones).
        given = dict(zip(self.kv_layers, zip(past[0::2], past[1::2], strict=True), strict=True))
        entries = [given[i] for i in range(len(given))] if len(given) == self.n_layers else None
        if entries is None:
            mark = past[0].new_zeros(past[0].shape[0], 1, past[0].shape[2], 1)
            entries = [given[i] if i in given else (mark, mark) for i in range(self.n_layers)]
        cache = DynamicCache(ddp_cache_data=entries)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, return_dict=True, **{self.cache_keyword: cache})
        layers = returned_cache(out).layers
        present = [t for i in self.kv_layers for t in (layers[i].keys, layers[i].values)]
        return (out.logits, *present)


def example_inputs(config, dtype: torch.dtype, device: torch.device,
                   layers: int | None = None) -> tuple[torch.Tensor, ...]:
    """Tracing inputs: batch 2, 3 new tokens on 4 past ones, one padded position (see EXAMPLE_*);
    KV tensors for ``layers`` layers (default: every layer)."""
    n_layers, kv_heads, head_dim = kv_layout(config)
    layers = n_layers if layers is None else layers
    vocab = config.get_text_config(decoder=True).vocab_size
    g = torch.Generator().manual_seed(0)
    total = EXAMPLE_PAST + EXAMPLE_SEQ
    ids = torch.randint(0, vocab, (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=g)
    mask = torch.ones(EXAMPLE_BATCH, total, dtype=torch.long)
    mask[0, 0] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, EXAMPLE_PAST:]
    past = [torch.randn(EXAMPLE_BATCH, kv_heads, EXAMPLE_PAST, head_dim, generator=g).to(dtype)
            for _ in range(2 * layers)]
    return tuple(t.to(device) for t in (ids, mask, pos, *past))


@contextlib.contextmanager
def export_mode(model: nn.Module):
    """Eager attention, eval mode and no grad for the time of the export; the model is restored after."""
    previous = model.config._attn_implementation
    training = model.training
    model.set_attn_implementation("eager")
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.set_attn_implementation(previous)
        model.train(training)


@contextlib.contextmanager
def quiet_exporter():
    """Silence the exporters' chatter (progress prints, torchvision notices, deprecation warnings)."""
    noisy = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration",
                                            "torch.export", "torch._dynamo", "torch.fx.experimental",
                                            "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in noisy]
    for lg in noisy:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(noisy, levels, strict=True):
            lg.setLevel(level)


def _export_dynamo(wrapper: KVDecoder, args: tuple, opset: int, path: Path, external: bool | None) -> bool:
    """torch.export + onnxscript; named dynamic dims. Returns whether the weights went to external data."""
    import onnx_ir as ir
    from torch.export import Dim

    layers = (len(args) - 3) // 2
    names_in, names_out = io_names(layers)
    batch, seq, past = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
    shapes = ({0: batch, 1: seq}, {0: batch, 1: Dim.DYNAMIC}, {0: batch, 1: seq},
              tuple({0: batch, 2: past} for _ in range(2 * layers)))
    with quiet_exporter():
        program = torch.onnx.export(wrapper, args, input_names=names_in, output_names=names_out,
                                    dynamic_shapes=shapes, opset_version=opset, dynamo=True, verbose=False,
                                    optimize=True)
    graph = program.model.graph
    mask = graph.inputs[1]
    mask.shape = ir.Shape([mask.shape[0], "past_sequence_length + sequence_length"])
    nbytes = sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
    external = nbytes > EXTERNAL_DATA_THRESHOLD if external is None else external
    ir.save(program.model, path, external_data=EXTERNAL_DATA_FILE if external else None)
    return external


def _export_torchscript(wrapper: KVDecoder, args: tuple, opset: int, path: Path, external: bool | None) -> bool:
    """The legacy tracer; its output is re-saved so that external data lands in one file."""
    import onnx

    layers = (len(args) - 3) // 2
    names_in, names_out = io_names(layers)
    total = "past_sequence_length + sequence_length"
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"}, "attention_mask": {0: "batch_size", 1: total},
            "position_ids": {0: "batch_size", 1: "sequence_length"}, "logits": {0: "batch_size", 1: "sequence_length"}}
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in names_in[3:]})
    axes.update({n: {0: "batch_size", 2: total} for n in names_out[1:]})
    with tempfile.TemporaryDirectory(prefix=".onnx-trace-", dir=path.parent) as tmp:
        traced = Path(tmp) / "model.onnx"
        with quiet_exporter():
            torch.onnx.export(wrapper, args, str(traced), input_names=names_in, output_names=names_out,
                              dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
        proto = onnx.load(str(traced))
        nbytes = sum(t.ByteSize() for t in proto.graph.initializer)
        external = nbytes > EXTERNAL_DATA_THRESHOLD if external is None else external
        if external:
            onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=EXTERNAL_DATA_FILE, size_threshold=1024)
        else:
            onnx.save_model(proto, str(path))
    return external


def export_onnx(model: nn.Module, tokenizer, out_dir: Path, fasp_info: FaspInfo | None = None, fp16: bool = False,
                opset: int = DEFAULT_OPSET, exporter: str = "auto", external_data: bool | None = None,
                progress: bool = False) -> dict:
    """Export ``model`` as ``out_dir/model.onnx`` (decoder with KV cache) plus config, tokenizer, fasp.json.

    ``fp16`` exports float16 weights and KV cache (from a float16 copy when the model is not float16;
    the model in memory is never changed); otherwise the graph is float32. ``exporter`` is ``auto``
    (dynamo, TorchScript if dynamo fails), ``dynamo`` or ``torchscript``. ``external_data`` forces
    (True) or forbids (False) ``model.onnx_data``; None decides by size. Returns {dir, files, bytes,
    exporter, opset, dtype, external_data, seconds}. Check the result with ``validate_onnx``.
    ``progress`` shows the steps (tracing takes minutes on a real model).
    """
    if exporter not in EXPORTERS:
        raise UsageError(f"exporter {exporter!r} is not one of {', '.join(EXPORTERS)}")
    check_opset(opset, exporter)
    if exporter == "auto" and opset < DYNAMO_MIN_OPSET:
        log.info("opset %d is older than the dynamo exporter writes: using the TorchScript exporter", opset)
        exporter = "torchscript"
    out_dir = Path(out_dir)
    dtype = torch.float16 if fp16 else torch.float32
    n_params = sum(p.numel() for p in model.parameters())
    check_disk(out_dir, int(n_params * dtype.itemsize * 1.05) + SIDE_FILES_BYTES)
    out_dir.mkdir(parents=True, exist_ok=True)
    net = model
    if model.dtype != dtype:
        log.info("exporting from a %s copy of the %s model", dtype, model.dtype)
        net = copy.deepcopy(model).to(dtype)
    device = next(net.parameters()).device
    path = out_dir / "model.onnx"
    start = time.perf_counter()
    used = None
    with steps("ONNX export", 2, progress) as bar, export_mode(net):  # a dynamo fallback adds one
        wrapper = KVDecoder(net).eval()
        if not wrapper.kv_layers:
            raise FaspxError("every layer's attention was removed: there is no KV cache to export")
        args = example_inputs(net.config, dtype, device, len(wrapper.kv_layers))
        if exporter in ("auto", "dynamo"):
            bar.next("dynamo: trace, convert, optimize, save")
            try:
                external = _export_dynamo(wrapper, args, opset, path, external_data)
                used = "dynamo"
            except Exception as err:  # noqa: BLE001 - any failure of the new exporter may fall back
                if exporter == "dynamo":
                    raise FaspxError(f"ONNX export (dynamo) failed: {type(err).__name__}: {err}") from err
                log.warning("dynamo ONNX export failed (%s: %s); falling back to the TorchScript exporter",
                            type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                for stale in (path, out_dir / EXTERNAL_DATA_FILE):
                    stale.unlink(missing_ok=True)
                bar.bar.total += 1
        if used is None:
            bar.next("torchscript: trace, save")
            external = _export_torchscript(wrapper, args, opset, path, external_data)
            used = "torchscript"
        seconds = time.perf_counter() - start
        bar.next("config, tokenizer, fasp.json")
        written = graph_opset(path)  # what the file says, whatever was asked
        write_config(net, out_dir, "float16" if fp16 else "float32", wrapper.kv_layers)
        write_side_files(net, tokenizer, out_dir, fasp_info)
        genai_reason = write_genai_config(net, out_dir)
    log.info("ONNX export (%s, opset %d) took %.1fs", used, written, seconds)
    return {**dir_summary(out_dir), "exporter": used, "opset": written, "dtype": "float16" if fp16 else "float32",
            "onnxruntime_genai": genai_reason or "genai_config.json written",
            "external_data": bool(external), "seconds": seconds}


def check_opset(opset: int, exporter: str = "auto") -> None:
    """UsageError for an opset the exporter cannot write (cheap: before any model is loaded)."""
    if opset < MIN_OPSET:
        raise UsageError(f"--opset {opset}: faspx exports opset {MIN_OPSET} or newer")
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise UsageError(f"--opset {opset}: the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or newer; use "
                         "--exporter torchscript (or auto) for an older opset")


def graph_opset(path: str | Path) -> int:
    """The default-domain opset a written ONNX file declares (its weights are not read)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _left_padded_batch(vocab: int, batch: int, length: int, pad_id: int, seed: int):
    """Random prompts with 0, 2, 4, ... left-padding positions (capped below ``length``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        n_pad = min(2 * b, length - 1)
        mask[b, :n_pad] = 0
        ids[b, :n_pad] = pad_id
    return ids, mask


@torch.no_grad()
def validate_onnx(onnx_dir: str | Path, model: nn.Module, atol: float | None = None, batch: int = 3,
                  length: int = 8, decode_steps: int = 3, seed: int = 0, progress: bool = False) -> dict:
    """Compare the exported graph with ``model`` in PyTorch on fresh random, left-padded inputs.

    Prefill (past length 0) and ``decode_steps`` single-token steps on top of the graph's own cache;
    logits are compared at non-padding positions, the present key/values at non-padding positions
    after the prefill. ``atol`` bounds max |ONNX - PyTorch| of the logits per unit of logit scale:
    the bound is atol * max(1, max |PyTorch logit|) (defaults: ATOL_FP32 = 1e-3 for float32 graphs,
    ATOL_FP16 = 1e-1 for float16 ones), because float32 rounding through a deep real model grows with
    the logits' magnitude (a 30-layer model with logits near 30 shows ~2e-3). Beyond it, or on NaN,
    a FaspxError is raised. Returns the max abs diffs and the bound applied. ``progress`` shows the steps.
    """
    from faspx.exporters.ort_runtime import OnnxDecoder

    with steps("ONNX validation", 2 + decode_steps, progress) as bar:
        bar.next("loading the graph in onnxruntime")
        dec = OnnxDecoder(onnx_dir, device="cpu")
        return _compare(dec, onnx_dir, model, atol, batch, length, decode_steps, seed, bar)


def _compare(dec, onnx_dir, model: nn.Module, atol: float | None, batch: int, length: int, decode_steps: int,
             seed: int, bar) -> dict:
    from transformers import DynamicCache

    from faspx.exporters.ort_runtime import positions

    bar.next("prefill, ONNX and PyTorch")
    if atol is None:
        atol = ATOL_FP16 if dec.kv_dtype == np.float16 else ATOL_FP32
    config = model.config.get_text_config(decoder=True)
    pad_id = config.pad_token_id if isinstance(config.pad_token_id, int) else 0
    pad_id = pad_id if 0 <= pad_id < config.vocab_size else 0
    ids, mask = _left_padded_batch(config.vocab_size, batch, length, pad_id, seed)
    device = next(model.parameters()).device
    keep = mask.bool().numpy()

    keyword = cache_keyword(model)

    def torch_run(ids, mask, cache):
        pos = torch.from_numpy(positions(mask.numpy(), ids.shape[1]))
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                    use_cache=True, **{keyword: cache})
        return out.logits.float().cpu().numpy()

    cache = DynamicCache(config=model.config)
    ref = torch_run(ids, mask, cache)
    scale = max(1.0, float(np.abs(ref)[keep].max()))
    logits, past = dec.prefill(ids.numpy(), mask.numpy())
    prefill_diff = float(np.abs(logits.astype(np.float32) - ref)[keep].max())
    present_diff = 0.0
    for layer, (key, value) in zip(kv_layers(model), zip(*[iter(dec.past_to_numpy(past))] * 2, strict=True),
                                   strict=True):
        ref_key, ref_value = (t.float().cpu().numpy() for t in (cache.layers[layer].keys, cache.layers[layer].values))
        if ref_key.shape != key.shape:  # a sliding-window cache may have dropped positions
            continue
        for got, want in ((key, ref_key), (value, ref_value)):
            # (batch, heads, length, dim): compare the non-padding positions of each row
            present_diff = max(present_diff, float(np.abs(got.astype(np.float32) - want)
                                                   .transpose(0, 2, 1, 3)[keep].max()))
    decode_diff = 0.0
    nxt = torch.from_numpy(ref[:, -1].argmax(-1))[:, None]
    for step in range(decode_steps):
        bar.next(f"decode step {step + 1}")
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
        ref = torch_run(nxt, mask, cache)
        scale = max(scale, float(np.abs(ref).max()))
        logits, past = dec.decode_step(nxt.numpy(), mask.numpy(), past)
        decode_diff = max(decode_diff, float(np.abs(logits.astype(np.float32) - ref).max()))
        nxt = torch.from_numpy(ref[:, -1].argmax(-1))[:, None]
    bound = atol * scale
    result = {"prefill_max_abs_diff": prefill_diff, "decode_max_abs_diff": decode_diff,
              "present_max_abs_diff": present_diff, "atol": atol, "logit_scale": scale, "bound": bound,
              "batch": batch, "prompt_length": length,
              "decode_steps": decode_steps, "max_past_length": length + decode_steps - 1}
    worst = max(prefill_diff, decode_diff)
    if not np.isfinite(worst) or not np.isfinite(present_diff) or worst > bound:
        raise FaspxError(
            f"the ONNX graph in {onnx_dir} does not match PyTorch: max |logits diff| prefill {prefill_diff:.3g}, "
            f"decode {decode_diff:.3g} (bound {bound:.3g} = {atol:g} x logit scale {scale:.3g}; pass a larger "
            "--atol to accept it)"
        )
    return result

