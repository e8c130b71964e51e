"""Weight-only quantization of an exported ONNX graph, and the checks a quantized graph can pass.

``quantize_onnx`` turns ``OUT/onnx`` (float32, validated against PyTorch) into ``OUT/onnx-int4`` or
``OUT/onnx-int8`` with onnxruntime's own quantizer (``MatMulNBitsQuantizer``, round-to-nearest,
symmetric, per block of ``block_size`` input channels, one float32 scale per block):

- every linear layer, the LM head included, becomes a ``MatMulNBits`` node (4 or 8 bits); an int4
  graph keeps some of them at 8 bits (``layout``, default ``mixed``: the LM head, attention's q/k/v and
  the FFN's output projection), which on SmolLM2-135M takes its perplexity cost from 1.39x to 1.08x;
- int4 also turns the token embedding table into ``GatherBlockQuantized`` (4 bits; onnxruntime's
  quantizer has no 8-bit Gather), so a model whose embeddings are a fifth of its weights (SmolLM2)
  gets them small too. int8 keeps the embedding table in float32 (what it costs is in the summary);
- a ``Gemm`` with a constant weight (OPT's FFN) is rewritten as MatMul + Add first, so it is quantized too;
- a graph with tied embeddings (one table for the lookup and, transposed, the LM head: the dynamo
  exporter stores it once) is untied first, since a quantized MatMul needs its weight as an
  initializer: the table is then stored twice, each copy quantized.

``accuracy_level`` is MatMulNBits' compute type on the CPU (4: int8 activations, the fast path; 0:
as the inputs). The KV cache and activations stay float32. A quantized graph cannot match PyTorch to
a logits bound, so ``validate_quantized`` compares it with the float32 graph it came from: perplexity
on the same windows (the check fails beyond ``PPL_BOUNDS``, generous on purpose) and greedy agreement
over a set of prompts, reported beside it.

Example:
    >>> from pathlib import Path
    >>> summary = quantize_onnx(Path("out/onnx"), Path("out/onnx-int4"), "int4")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np

from faspx.errors import FaspxError, UsageError
from faspx.exporters.files import weight_file_bytes

log = logging.getLogger("faspx")

PRECISIONS = {"int4": 4, "int8": 8}
# Which linears of an int4 graph keep 8 bits (the idea of llama.cpp's Q4_K_M: the layers whose error
# the model feels most get more bits). mixed: the LM head, attention's q/k/v and the FFN's output
# projection in every layer; half: the LM head, and q/k/v and the FFN output in half the layers (the
# first and last eighth and every third in between, as Q4_K_M picks); uniform: none. Measured on
# SmolLM2-135M in docs/benchmarks.md.
INT4_LAYOUTS = ("mixed", "half", "uniform")
DEFAULT_INT4_LAYOUT = "mixed"
EIGHT_BIT_ROLES = {"attention input": ("q_proj", "k_proj", "v_proj", "qkv_proj"), "FFN output": ("down_proj", "fc2")}
DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4
# Quantized / float32 perplexity above which the quantized graph is refused: generous on purpose, so
# that only a broken quantization fails (what a precision costs is reported, in quantization.json).
PPL_BOUNDS = {"int8": 1.05, "int4": 1.5}
EXTERNAL_DATA_BYTES = 2**31 - 2**26  # protobuf's 2 GB limit, with room for the graph itself


def check_quantize(precision: str | None, block_size: int = DEFAULT_BLOCK_SIZE,
                   accuracy_level: int = DEFAULT_ACCURACY_LEVEL, layout: str = DEFAULT_INT4_LAYOUT) -> None:
    """UsageError for settings MatMulNBits cannot take, before any work.

    Example:
        >>> check_quantize("int4", 48)
        Traceback (most recent call last):
        ...
        faspx.errors.UsageError: --block-size must be a power of two from 16 to 256 (got 48)
    """
    if precision is None:
        return
    if precision not in PRECISIONS:
        raise UsageError(f"--quantize must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if block_size < 16 or block_size > 256 or block_size & (block_size - 1):
        raise UsageError(f"--block-size must be a power of two from 16 to 256 (got {block_size})")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise UsageError(f"--accuracy-level must be 0..4 (got {accuracy_level}): MatMulNBits' compute type")
    if layout not in INT4_LAYOUTS:
        raise UsageError(f"--int4-layout must be one of {', '.join(INT4_LAYOUTS)} (got {layout!r})")


def _transposed(graph, inits: dict, name: str) -> str:
    """The name of an initializer holding ``name``'s 2-D weight transposed (added once, then shared)."""
    from onnx import numpy_helper

    copy = f"{name}.transposed"
    if copy not in inits:
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[name]).T),
                                                         copy))
        inits[copy] = graph.initializer[-1]
    return copy


def untie_transposed_weights(model) -> list[str]:
    """Give every MatMul weight or Gather table that is ``Transpose(initializer)`` an initializer of
    its own (the transposed copy), so that it can be quantized; the Transpose goes when nothing else
    reads it. Returns the initializers copied: the tied table of a dynamo export (stored for the
    lookup, transposed for the LM head) or of the builder's (stored for the head, transposed for the
    lookup)."""

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    copied = []
    for node in list(graph.node):
        slot = {"MatMul": 1, "Gather": 0}.get(node.op_type)
        if slot is None or node.input[slot] in inits:
            continue
        transpose = producers.get(node.input[slot])
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        if len(inits[transpose.input[0]].dims) != 2 or perm not in (None, [1, 0]):
            continue
        if f"{transpose.input[0]}.transposed" not in inits:
            copied.append(transpose.input[0])
        readers[node.input[slot]] -= 1
        node.input[slot] = _transposed(graph, inits, transpose.input[0])
        if readers[transpose.output[0]] == 0:
            graph.node.remove(transpose)
    return copied


def gemms_to_matmuls(model) -> int:
    """Rewrite each ``Gemm(A, W, C)`` with a constant weight (OPT's FFN, traced on 2-D activations) as
    ``MatMul(A, W') + C``, the form MatMulNBits replaces; ``W'`` is ``W`` transposed when ``transB``.
    Returns how many were rewritten (a Gemm with alpha, beta != 1 or transA is left alone)."""
    from onnx import helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    rewritten = 0
    for index, node in reversed(list(enumerate(graph.node))):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            continue
        weight = _transposed(graph, inits, node.input[1]) if attrs.get("transB", 0) else node.input[1]
        product = node.output[0] if len(node.input) < 3 or not node.input[2] else f"{node.output[0]}_matmul"
        new = [helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}_matmul")]
        if product != node.output[0]:
            new.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        graph.node.remove(node)
        for offset, replacement in enumerate(new):
            graph.node.insert(index + offset, replacement)
        rewritten += 1
    used = {name for n in graph.node for name in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:  # the untransposed copies
        graph.initializer.remove(init)
    return rewritten


def _scope(node) -> str:
    """What names a MatMul's module: its node name, the module path the dynamo exporter records, and
    its weight's name (the TorchScript exporter and the builder name nodes by module; dynamo does not)."""
    scopes = [p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"]
    return " ".join([node.name, *scopes, node.input[1] if len(node.input) > 1 else ""])


def eight_bit_matmuls(model, layout: str) -> list[str]:
    """The names of the MatMul nodes (constant 2-D weight) an int4 graph of ``layout`` keeps at 8 bits:
    the LM head (the one behind the ``logits`` output) and, by module name, the attention's q/k/v
    and the FFN's output projection of every layer (``mixed``) or of half of them (``half``)."""
    import re

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    matmuls = [n for n in graph.node
               if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    if layout == "uniform" or not matmuls:
        return []
    heads = [_head(graph, inits)] if _head(graph, inits) else []
    layers = {}
    for n in matmuls:
        match = re.search(r"layers[._](\d+)", _scope(n))
        roles = [r for r, parts in EIGHT_BIT_ROLES.items() if any(p in _scope(n) for p in parts)]
        if match and roles and n.name not in heads:
            layers.setdefault(int(match.group(1)), []).append(n.name)
    count = max(layers, default=-1) + 1
    if layout == "half":  # Q4_K_M's choice: the first and last eighth, and every third layer in between
        keep = {i for i in range(count) if i < count / 8 or i >= 7 * count / 8 or (i - count // 8) % 3 == 2}
        layers = {i: names for i, names in layers.items() if i in keep}
    return heads + [name for i in sorted(layers) for name in layers[i]]


def _head(graph, inits: dict) -> str | None:
    """The LM head: the first MatMul with a constant weight met walking back from the ``logits`` output
    (OPT and some exporters put a Cast or a Reshape after it)."""
    producers = {out: node for node in graph.node for out in node.output}
    names = [o.name for o in graph.output]
    frontier = ["logits" if "logits" in names else names[0]]
    seen: set[str] = set()
    while frontier:
        node = producers.get(frontier.pop(0))
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "MatMul" and node.input[1] in inits:
            return node.name
        frontier += [i for i in node.input if i and i not in inits]
    return None


def _named(model) -> None:
    """Name every unnamed node (the quantizer's exclusions go by node name)."""
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"faspx_node_{index}"


def expected_weight_bytes(model, bits: int, block_size: int, embeddings: bool, eight: tuple[str, ...] = ()) -> int:
    """Initializer bytes after quantization, from the float32 graph: a 2-D MatMul weight (K x N) takes
    N x ceil(K / block) blocks of block x bits / 8 bytes plus a float32 scale (symmetric: no zero
    point), 8 bits for the MatMul nodes named in ``eight``; with ``embeddings`` (4 bits) the Gather
    table (V x H) takes V x ceil(H / block) such blocks; everything else as stored. The quantizer's
    output is checked against this (tests)."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    quantized = {n.input[1]: "MatMul" for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits
                 and len(inits[n.input[1]].dims) == 2}
    wide = {n.input[1] for n in graph.node if n.name in set(eight)}
    if embeddings and bits == 4:
        quantized.update({n.input[0]: "Gather" for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                          and len(inits[n.input[0]].dims) == 2})
    total = 0
    for name, init in inits.items():
        if name not in quantized:
            total += numpy_helper.to_array(init).nbytes
            continue
        rows, cols = init.dims
        k, n = (rows, cols) if quantized[name] == "MatMul" else (cols, rows)  # blocks run along K (H for Gather)
        width = 8 if name in wide else bits
        total += n * math.ceil(k / block_size) * (block_size * width // 8 + 4)
    return total


def _quantize_pass(model, bits: int, block_size: int, accuracy_level: int, ops: tuple[str, ...],
                   exclude: list[str] = (), include: list[str] | None = None):
    """One run of onnxruntime's quantizer (RTN, symmetric) over ``ops`` (or only the nodes ``include``
    names), leaving the nodes ``exclude`` names alone; returns the new model."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    axes = (("MatMul", 0), ("Gather", 1))
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                                          bits=bits, op_types_to_quantize=ops, quant_axes=axes)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, op_types_to_quantize=ops, quant_axes=axes,
                                     algo_config=config, nodes_to_exclude=list(exclude), nodes_to_include=include)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer.process()
    return quantizer.model.model


def quantize_onnx(src: Path, dst: Path, precision: str, block_size: int = DEFAULT_BLOCK_SIZE,
                  accuracy_level: int = DEFAULT_ACCURACY_LEVEL, embeddings: bool = True,
                  layout: str = DEFAULT_INT4_LAYOUT) -> dict:
    """Write the quantized copy of the export in ``src`` into ``dst`` (which exists and is empty: the
    caller's temporary directory): model.onnx (+ model.onnx_data above 2 GB) and the side files, with
    ``faspx_quantization`` in config.json. An int4 graph keeps the linears ``layout`` names
    (``INT4_LAYOUTS``) at 8 bits. Returns the summary (what was quantized, sizes, seconds)."""
    import onnx

    check_quantize(precision, block_size, accuracy_level, layout)
    bits = PRECISIONS[precision]
    start = time.perf_counter()
    model = onnx.load(str(Path(src) / "model.onnx"))
    untied = untie_transposed_weights(model)
    gemms = gemms_to_matmuls(model)
    _named(model)
    eight = eight_bit_matmuls(model, layout) if bits == 4 else []
    expected = expected_weight_bytes(model, bits, block_size, embeddings, tuple(eight))
    ops = ("MatMul", "Gather") if embeddings and bits == 4 else ("MatMul",)
    out = _quantize_pass(model, bits, block_size, accuracy_level, ops, exclude=eight)
    if eight:
        out = _quantize_pass(out, 8, block_size, accuracy_level, ("MatMul",), include=eight)
    external = out.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save_model(out, str(Path(dst) / "model.onnx"), save_as_external_data=external,
                    location="model.onnx_data" if external else None, all_tensors_to_one_file=True)
    for side in Path(src).iterdir():
        if side.is_file() and not side.name.startswith("model.onnx"):
            shutil.copy2(side, Path(dst) / side.name)
    counts = {op: sum(1 for n in out.graph.node if n.op_type == op)
              for op in ("MatMulNBits", "GatherBlockQuantized", "MatMul", "Gather")}
    left = [n.name for n in out.graph.node if n.op_type == "MatMul"
            and any(i.name == n.input[1] for i in out.graph.initializer)]
    if counts["MatMulNBits"] == 0:
        raise FaspxError(f"onnxruntime's quantizer left no MatMulNBits in {src / 'model.onnx'}: nothing was quantized")
    summary = {"precision": precision, "bits": bits, "block_size": block_size, "accuracy_level": accuracy_level,
               "symmetric": True, "embeddings": "int4 (GatherBlockQuantized)" if "Gather" in ops else "float32",
               "layout": layout if bits == 4 else None, "eight_bit_matmuls": len(eight),
               "untied": untied, "gemms_rewritten": gemms, "nodes": counts, "float_matmuls_left": left,
               "bytes": weight_file_bytes(dst), "source_bytes": weight_file_bytes(src),
               "expected_bytes": expected, "seconds": time.perf_counter() - start}
    config_path = Path(dst) / "config.json"
    if config_path.exists():
        data = json.loads(config_path.read_text())
        data["faspx_quantization"] = {k: summary[k] for k in ("precision", "block_size", "accuracy_level",
                                                               "symmetric", "embeddings", "layout",
                                                               "eight_bit_matmuls")}
        config_path.write_text(json.dumps(data, indent=2) + "\n")
    log.info("quantized %s to %s: %d MatMulNBits, %d GatherBlockQuantized, %.1f MB -> %.1f MB in %.1fs", src,
             precision, counts["MatMulNBits"], counts["GatherBlockQuantized"], summary["source_bytes"] / 1e6,
             summary["bytes"] / 1e6, summary["seconds"])
    return summary


def greedy_agreement(reference: np.ndarray, other: np.ndarray, prompt_len: int) -> dict:
    """How far two greedy continuations of the same prompts agree: the fraction of new tokens equal
    position by position, and the mean fraction before the first difference (the stricter one).

    Example:
        >>> ref = np.array([[1, 2, 3, 4, 5]]); other = np.array([[1, 2, 3, 9, 5]])
        >>> greedy_agreement(ref, other, 2)
        {'tokens_equal': 0.6666666666666666, 'prefix_equal': 0.3333333333333333, 'prompts': 1, 'new_tokens': 3}
    """
    new_ref, new_other = reference[:, prompt_len:], other[:, prompt_len:]
    n = min(new_ref.shape[1], new_other.shape[1])
    equal = new_ref[:, :n] == new_other[:, :n]
    prefix = [int(np.argmin(row)) if not row.all() else n for row in equal]
    return {"tokens_equal": float(equal.mean()), "prefix_equal": float(np.mean(prefix) / n),
            "prompts": int(equal.shape[0]), "new_tokens": n}


def validate_quantized(quantized_dir: Path, reference_dir: Path, ids, seqlen: int, windows: int = 8,
                       prompts: int = 8, prompt_len: int = 32, new_tokens: int = 32, bound: float | None = None,
                       progress: bool = False) -> dict:
    """Perplexity of the quantized graph and of its float32 source on the first ``windows`` windows of
    ``ids`` (a 1 x N token row), and their greedy agreement on ``prompts`` prompts (the first
    ``prompt_len`` tokens of consecutive windows, ``new_tokens`` each), both in onnxruntime on the CPU.
    FaspxError when the perplexity ratio passes ``bound`` (default: ``PPL_BOUNDS`` of its precision)."""
    import torch

    from faspx.eval import perplexity
    from faspx.exporters.ort_runtime import OnnxDecoder

    precision = json.loads((Path(quantized_dir) / "config.json").read_text())["faspx_quantization"]["precision"]
    bound = PPL_BOUNDS[precision] if bound is None else bound
    windows = max(1, min(windows, ids.numel() // seqlen))
    result: dict = {"precision": precision, "windows": windows, "seqlen": seqlen, "bound": bound}
    greedy = {}
    for name, directory in (("float32", reference_dir), (precision, quantized_dir)):
        decoder = OnnxDecoder(directory, device="cpu")
        result[f"ppl_{name}"] = perplexity(lambda x, d=decoder: torch.from_numpy(d.prefill(x.numpy())[0]), ids,
                                           seqlen, max_windows=windows, progress=progress)
        starts = [w * (ids.numel() // prompts) for w in range(prompts)]
        batch = np.stack([ids[0, s:s + prompt_len].numpy() for s in starts])
        greedy[name] = decoder.generate(batch, max_new_tokens=new_tokens, eos_token_id=[])
    result["ppl_ratio"] = result[f"ppl_{precision}"] / result["ppl_float32"]
    result["greedy"] = greedy_agreement(greedy["float32"], greedy[precision], prompt_len)
    if not result["ppl_ratio"] <= bound:
        raise FaspxError(f"the {precision} graph's perplexity is {result['ppl_ratio']:.3f}x the float32 graph's "
                         f"({result[f'ppl_{precision}']:.3f} vs {result['ppl_float32']:.3f}), above the bound "
                         f"{bound:g}x: the quantization is broken; try --block-size 16 or --quantize int8")
    return result
