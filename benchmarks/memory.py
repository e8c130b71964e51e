"""Memory figures: weights, KV cache, disk, and the process or device peaks."""

from __future__ import annotations

import math
import resource
import sys
from pathlib import Path

import torch

from faspx.adapters import attention_shape

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx", ".onnx_data", ".data")


def rss_bytes() -> int:
    """Resident memory of this process now."""
    import psutil

    return psutil.Process().memory_info().rss


def release_free_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the OS (glibc ``malloc_trim``), so an
    RSS delta measured next counts new memory, not pages an earlier model left free in the heap."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def peak_rss_bytes() -> int:
    """The process's resident-memory high-water mark so far (monotone: it never goes down)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def disk_bytes(path: Path, weights_only: bool = False) -> int:
    """Bytes of every file under ``path`` (or of the file itself); with ``weights_only`` only the
    weight files (safetensors, bin, onnx and its external data), not the tokenizer or configs."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if not weights_only or p.name.endswith(WEIGHT_SUFFIXES))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the stored parameters (``parameters()`` yields tied ones once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_read_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one decode step at batch 1 reads: every parameter but the embedding tables (of
    which a step reads one row each), the lm_head included even when it is tied to the input
    embedding. Zeroed-but-stored weights count: they are read like any others."""
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    tables = {id(m.weight): m.weight for m in model.modules()
              if isinstance(m, torch.nn.Embedding) and m.weight is not head_weight}
    return weight_bytes(model) - sum(w.numel() * w.element_size() for w in tables.values())


def layer_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes of the decoder layers alone (no embedding tables, no lm_head): their ratio bounds a
    prefill's speedup, whose FLOPs are in these layers (the unpruned lm_head and attention scores only
    lower it)."""
    head = model.get_output_embeddings()
    return decode_read_bytes(model) - (head.weight.numel() * head.weight.element_size() if head is not None else 0)


def attention_layer_count(config) -> int:
    """Decoder layers that have attention (a KV cache entry): all of them, but for the nemotron-nas
    blocks marked ``attention.no_op`` (``--recipe 2ssp``).

    Example:
        >>> from types import SimpleNamespace as NS
        >>> attention_layer_count(NS(num_hidden_layers=3, block_configs=[{"attention": {"no_op": True}}] +
        ...                          [{"attention": {"no_op": False}}] * 2))
        2
    """
    blocks = getattr(config, "block_configs", None)
    if not blocks:
        return config.num_hidden_layers

    def no_op(block) -> bool:
        attention = block["attention"] if isinstance(block, dict) else block.attention
        return bool(attention["no_op"] if isinstance(attention, dict) else attention.no_op)

    return sum(not no_op(b) for b in blocks)


def kv_bytes_per_token(config, bytes_per_value: int) -> int:
    """KV cache bytes one token of one sequence takes: layers with attention * 2 * kv_heads * head_dim * bytes."""
    _, kv_heads, head_dim = attention_shape(config)
    return attention_layer_count(config) * 2 * kv_heads * head_dim * bytes_per_value


def kv_cache_bytes(config, batch: int, length: int, bytes_per_value: int) -> int:
    """Keys and values of every layer with attention for ``batch`` sequences of ``length`` tokens:
    layers * 2 * batch * kv_heads * length * head_dim * bytes."""
    return batch * length * kv_bytes_per_token(config, bytes_per_value)


def cuda_used_bytes(device: torch.device) -> int:
    """Memory in use on the whole GPU (every process and allocator, onnxruntime's and vLLM's too)."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free


class RssPeaks:
    """Peak resident memory per interval, where Linux allows resetting the high-water mark.

    ``start()`` begins an interval (it resets the kernel's VmHWM through /proc/self/clear_refs);
    ``stop()`` returns the peak RSS seen since, or None where the mark cannot be reset (then callers
    fall back to RSS sampled at chosen points). Resetting the mark also lowers what getrusage reports,
    so ``process_peak`` keeps the process's peak over the whole run itself.
    """

    STATUS = Path("/proc/self/status")
    CLEAR = Path("/proc/self/clear_refs")

    def __init__(self):
        self.process_peak = peak_rss_bytes()
        self.resettable = self._try_reset()

    def _hwm(self) -> int | None:
        try:
            for line in self.STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def _try_reset(self) -> bool:
        hwm = self._hwm()
        if hwm is None:
            return False
        self.process_peak = max(self.process_peak, hwm)
        try:
            self.CLEAR.write_text("5")
        except OSError:
            return False
        return True

    def start(self) -> None:
        if self.resettable:
            self.resettable = self._try_reset()

    def stop(self) -> int | None:
        hwm = self._hwm() if self.resettable else None
        if hwm is not None:
            self.process_peak = max(self.process_peak, hwm)
        return hwm

    def overall(self) -> int:
        """The process's peak RSS from its start to now (across every reset)."""
        hwm = self._hwm()
        return max(self.process_peak, hwm or 0, 0 if self.resettable else peak_rss_bytes())


# Ops whose first input is a table a decode step reads one row of (its scales and zero points too).
TABLE_LOOKUPS = {"Gather": (0,), "GatherBlockQuantized": (0, 1, 2)}


def initializer_bytes(tensor) -> int:
    """Bytes an ONNX initializer takes, from its type and shape (external data is not read); 4-bit
    types pack two values per byte."""
    from onnx import TensorProto, helper

    count = math.prod(tensor.dims)
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (count + 1) // 2
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def onnx_read_bytes(onnx_dir: Path) -> int:
    """Weight bytes one batch-1 decode step of an ONNX graph reads: every initializer but the lookup
    tables (a ``Gather`` or ``GatherBlockQuantized`` table that nothing else reads, of which a step
    reads one row): for a quantized graph its packed weights, scales and zero points. A table that is
    also the LM head (tied, e.g. through a Transpose) is read whole and counts. The graph's structure
    is read, not its external data.

    Example:
        >>> import tempfile, numpy as np, onnx
        >>> from onnx import helper, numpy_helper
        >>> table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "table")
        >>> head = numpy_helper.from_array(np.zeros((4, 10), np.float32), "head")
        >>> graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["h"]),
        ...                            helper.make_node("MatMul", ["h", "head"], ["logits"])], "g",
        ...                           [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1])],
        ...                           [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 10])],
        ...                           [table, head])
        >>> d = Path(tempfile.mkdtemp()); onnx.save(helper.make_model(graph), str(d / "model.onnx"))
        >>> onnx_read_bytes(d)  # the head (4 x 10 float32), not the table
        160
    """
    import onnx

    graph = onnx.load(str(Path(onnx_dir) / "model.onnx"), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    table, other = set(), set()
    for node in graph.node:
        lookup = TABLE_LOOKUPS.get(node.op_type, ())
        for slot, name in enumerate(node.input):
            if name in inits:
                (table if slot in lookup else other).add(name)
    return sum(initializer_bytes(t) for name, t in inits.items() if name not in table - other)
