"""run_bench: dense vs pruned, per backend and batch size, interleaved, into one report dict."""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from faspx.benchmarks import memory
from faspx.benchmarks.backends import BACKENDS, load_runner, ort_device, unavailable
from faspx.benchmarks.environment import environment
from faspx.benchmarks.inputs import check_pair, export_for_bench, onnx_settings, quantized_dirs, variant_dirs
from faspx.benchmarks.timing import figures, interleave, noise_flags, ratios
from faspx.errors import UsageError

log = logging.getLogger("faspx")
VARIANTS = ("dense", "pruned")
# A pruned build's quantized ONNX exports (OUT/onnx-int8, OUT/onnx-int4) run as further variants of the
# ONNX backends, named "pruned-int8", "pruned-int4": every ratio of theirs is against the dense float32 graph.
QUANTIZED_PREFIX = "pruned-"
# Backends that run the ONNX export (a variant without one is exported into ONNX_CACHE first).
ONNX_BACKENDS = ("onnxruntime", "genai")
ONNX_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "faspx" / "bench-onnx"

MEMORY_DEFINITIONS = {
    "weight_bytes": "parameter bytes the backend holds (as loaded: fp32 on the CPU, bf16 for torch on CUDA; "
                    "for onnxruntime the bytes of model.onnx and its external data)",
    "kv_cache_bytes": "KV cache at the measured length, from the config: "
                      "layers x 2 x batch x kv_heads x (prompt_len + new_tokens - 1) x head_dim x bytes",
    "kv_bytes_per_token": "KV cache bytes one token of one sequence takes (layers with attention x 2 x kv_heads x "
                          "head_dim x bytes): a layer whose attention was removed (2SSP) holds none",
    "rss_load_delta_bytes": "process RSS added by loading this variant in this backend, before any run (weights "
                            "that are memory-mapped become resident only when a run first reads them)",
    "rss_load_run_peak_bytes": "peak process RSS while loading this variant and running one generation at the "
                               "first batch size, above the RSS before the load: what this variant adds to the "
                               "process (weights paged in, runtime buffers, one generation's working memory); "
                               "measured right after loading, one variant after the other, before any timed run",
    "rss_run_peak_delta_bytes": "peak RSS during a generation above the RSS just before it (max over warm-up and "
                                "timed runs): the KV cache and activations. Pages freed by earlier runs are "
                                "reused without new RSS, so this is a lower bound of the run's working memory",
    "cuda_peak_allocated_bytes": "torch.cuda.max_memory_allocated during a run (both variants' weights resident)",
    "cuda_peak_reserved_bytes": "torch.cuda.max_memory_reserved during a run (the caching allocator's pool)",
    "cuda_peak_working_bytes": "max_memory_allocated minus what was allocated before the run: this variant's KV "
                               "cache and activations",
    "cuda_load_delta_bytes": "GPU memory in use (whole device) added by loading this variant; for vLLM its "
                             "preallocated KV pool included",
    "vllm_rss_bytes": "RSS of the vLLM processes of this variant (its engine core and workers hold the weights and "
                      "the KV pool; the faspx process holds neither), after one generation",
    "vllm_kv_pool_bytes": "the KV cache vLLM reserved for this variant (its block count x block size x bytes per "
                          "token, in the dtype it serves)",
    "vllm_startup_s": "seconds from starting the vLLM engine to its first request",
}


def _dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def roofline(configs: dict) -> dict:
    """Ideal batch-1 decode speedup: decode is bound by reading the weights, so it is the ratio of the
    weight bytes each decode step reads (decoder weights + lm_head; embedding tables excepted, of which
    a step reads one row). Zeroed-but-stored weights count: they are read. A prefill is bound by its
    FLOPs instead, nearly all in the decoder layers: their weight ratio bounds its speedup (and the
    end-to-end one, a mix of both phases)."""
    from faspx.models import meta_model

    read, layers = {}, {}
    for name, config in configs.items():
        model = meta_model(config).to(_dtype(config))
        read[name], layers[name] = memory.decode_read_bytes(model), memory.layer_weight_bytes(model)
    return {"dense_read_bytes": read["dense"], "pruned_read_bytes": read["pruned"],
            "ideal_decode_speedup": read["dense"] / read["pruned"],
            "ideal_prefill_speedup": layers["dense"] / layers["pruned"]}


def decode_bound(read_values: dict, configs: dict, batch: int, context: float, bytes_per_value: int) -> float:
    """Ideal dense/pruned decode speedup when a step reads the weights once (``read_values``: the
    weight values each variant reads per step, from the roofline) and the KV cache of every sequence
    (``context`` tokens each): the roofline with the cache, which at a long context is where removing
    attention (2SSP) pays. Weights and cache counted at ``bytes_per_value``.

    Example:
        >>> from transformers import LlamaConfig
        >>> c = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                 vocab_size=64)
        >>> decode_bound({"dense": 1000, "pruned": 1000}, {"dense": c, "pruned": c}, 1, 100.0, 4)
        1.0
    """
    read = {name: read_values[name] * bytes_per_value
            + batch * context * memory.kv_bytes_per_token(config, bytes_per_value) for name, config in configs.items()}
    return read["dense"] / read["pruned"]


def stored(config) -> dict:
    """Parameter count and weight bytes of a checkpoint (from its config, nothing loaded)."""
    from faspx.models import meta_model

    model = meta_model(config).to(_dtype(config))
    return {"params": sum(p.numel() for p in model.parameters()), "weight_bytes": memory.weight_bytes(model),
            "dtype": str(_dtype(config)).removeprefix("torch."),
            "attention_layers": memory.attention_layer_count(config),
            "kv_values_per_token": memory.kv_bytes_per_token(config, 1)}


def quantized_variants(pruned_root: Path, precisions: tuple[str, ...] | None, backends: tuple[str, ...]
                       ) -> dict[str, Path]:
    """{'pruned-int8': OUT/onnx-int8, ...}: the quantized exports to measure. ``precisions`` None takes
    every one the build has (none when no ONNX backend runs); named ones must exist (UsageError).

    Example:
        >>> quantized_variants(Path("/nonexistent"), None, ("torch",))
        {}
    """
    from faspx.exporters.quantize import PRECISIONS

    found = quantized_dirs(pruned_root)
    if precisions is None:
        chosen = found if any(b in ONNX_BACKENDS for b in backends) else {}
    else:
        for precision in precisions:
            if precision not in PRECISIONS:
                raise UsageError(f"--precisions takes {', '.join(PRECISIONS)} (got {precision!r}; float32 is the "
                                 "pruned variant itself)")
            if precision not in found:
                raise UsageError(f"--precisions {precision}: {pruned_root} has no onnx-{precision}/model.onnx; write "
                                 f"it with faspx export --target onnx --quantize {precision} (or build --quantize)")
        if precisions and not any(b in ONNX_BACKENDS for b in backends):
            raise UsageError(f"--precisions runs quantized ONNX graphs: add --backend onnxruntime or genai "
                             f"(got {', '.join(backends)})")
        chosen = {p: found[p] for p in precisions}
    return {f"{QUANTIZED_PREFIX}{p}": d for p, d in chosen.items()}


def _check(backends, batches, prompt_lens: tuple[int, ...], new_tokens: int, repeats: int, warmup: int,
           configs: dict) -> None:
    if (new_tokens < 2 or not prompt_lens or min(prompt_lens) < 1 or repeats < 1 or warmup < 0 or not batches
            or min(batches) < 1):
        raise UsageError("need --new-tokens >= 2, --prompt-len >= 1, --repeats >= 1, --warmup >= 0 and batch "
                         "sizes >= 1")
    for backend in backends:
        if backend not in BACKENDS:
            raise UsageError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    for name, config in configs.items():
        positions = getattr(config, "max_position_embeddings", None)
        if positions and max(prompt_lens) + new_tokens > positions:
            raise UsageError(f"--prompt-len + --new-tokens = {max(prompt_lens) + new_tokens} exceeds the {name} "
                             f"model's {positions} positions")
    if configs["dense"].vocab_size != configs["pruned"].vocab_size:
        raise UsageError(f"dense and pruned vocabularies differ ({configs['dense'].vocab_size} vs "
                         f"{configs['pruned'].vocab_size}): not the same model")


def run_bench(dense: str | Path, pruned: str | Path, backends: tuple[str, ...] = ("torch", "onnxruntime"),
              device: str = "auto", batches: tuple[int, ...] = (1, 8), prompt_len: int | tuple[int, ...] = 128,
              new_tokens: int = 128, repeats: int = 5, warmup: int = 1, progress: bool = True, *,
              eval: bool = False, eval_datasets: tuple[str, ...] = ("wikitext2",),
              max_windows: int | None = None, seed: int = 0, out: str | Path | None = None, force: bool = False,
              precisions: tuple[str, ...] | None = None, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Measure dense and pruned in one run (interleaved, A B A B ...) and return the report.

    ``dense`` is an HF model directory (or a faspx build output); ``pruned`` a faspx build output
    (``hf/``, ``onnx/``; stock or nemotron-nas) or an HF directory. Prompts are ``batch`` x
    ``prompt_len`` random token ids (seed ``seed``; several lengths, e.g. ``(128, 2048)``, give one
    cell per length and batch: at a long prompt the KV cache, which attention removal shrinks, is
    what decode reads beside the weights), then ``new_tokens`` greedy tokens with the KV cache. With
    ``eval`` both variants' perplexity on ``eval_datasets`` (wikitext2, c4 or local files; first
    ``max_windows`` windows) is added. The pruned build's quantized exports (``precisions``: int8,
    int4; None: every one it has) run as further variants in the ONNX backends, each against the dense
    float32 graph, with the weight bytes their graph reads per step and, with ``eval``, their
    perplexity in onnxruntime. With ``out`` the report files (report.json, report.md, report.png)
    are written there atomically.
    Every raw sample is in the returned dict; ``clock`` is injectable for tests.

    Example:
        >>> report = run_bench("smollm2", "out/demo", backends=("torch",), batches=(1,))  # doctest: +SKIP
        >>> report["results"][0]["ratios"]["decode_tokens_per_s"]  # doctest: +SKIP
    """
    from faspx.models import check_config_file, check_weight_files, hf_config
    from faspx.outputs import atomic_dir, check_out
    from faspx.pipeline import check_eval
    from faspx.prune import resolve_device

    # Every check that needs no weights first: outputs, options, the pair, the evaluation text.
    if out is not None:
        check_out(out, force)
    backends, batches = tuple(backends), tuple(batches)
    prompt_lens = (prompt_len,) if isinstance(prompt_len, int) else tuple(prompt_len)
    dev = resolve_device(device)
    dirs = variant_dirs(Path(dense), Path(pruned))
    for d in dirs.values():
        check_config_file(d["hf"] / "config.json")
        check_weight_files(d["hf"])
    configs = {name: hf_config(d["hf"]) for name, d in dirs.items()}
    _check(backends, batches, prompt_lens, new_tokens, repeats, warmup, configs)
    pair_notes = check_pair(dirs, configs)
    quantized = quantized_variants(dirs["pruned"]["root"], None if precisions is None else tuple(precisions),
                                   backends)
    configs_of = {**configs, **{name: configs["pruned"] for name in quantized}}
    if eval:
        for dataset in eval_datasets:
            check_eval(dataset, max_windows)
    report: dict = {
        "environment": environment(dev),
        "settings": {"dense": str(dense), "pruned": str(pruned), "backends": list(backends), "device": device,
                     "batches": list(batches), "prompt_lens": list(prompt_lens), "new_tokens": new_tokens,
                     "repeats": repeats, "warmup": warmup, "seed": seed, "eval": eval,
                     "eval_datasets": list(eval_datasets) if eval else [], "max_windows": max_windows,
                     "quantized": list(quantized)},
        "roofline": roofline(configs), "results": [], "skipped": [], "notes": pair_notes,
        "memory_definitions": MEMORY_DEFINITIONS,
    }
    for name, d in dirs.items():
        report[name] = {"hf_dir": str(d["hf"]), "onnx_dir": str(d["onnx"]) if d["onnx"] else None,
                        **stored(configs[name]), "disk_bytes": {"hf": memory.disk_bytes(d["hf"], weights_only=True)},
                        "dir_bytes": {"hf": memory.disk_bytes(d["hf"])}}
    for name, d in quantized.items():
        report[name] = {"onnx_dir": str(d), "quantization": _quantization(d),
                        "disk_bytes": {"onnx": memory.disk_bytes(d, weights_only=True)},
                        "dir_bytes": {"onnx": memory.disk_bytes(d)}, "onnx_read_bytes": memory.onnx_read_bytes(d)}
    peaks = memory.RssPeaks()
    cells = [(length, batch) for length in prompt_lens for batch in batches]
    read_values = {name: report["roofline"][f"{name}_read_bytes"] / _dtype(config).itemsize
                   for name, config in configs.items()}
    names_of = {b: VARIANTS + (tuple(quantized) if b in ONNX_BACKENDS else ()) for b in backends}
    runs_of = {b: (len(cells) * (warmup + repeats) + 1) * len(names_of[b]) for b in backends}
    bar = tqdm(total=sum(runs_of.values()), desc="benchmark", unit="run", disable=not progress)
    for backend in backends:
        per_backend = runs_of[backend]
        reason = unavailable(backend, dev)
        if reason is None and backend in ONNX_BACKENDS and dirs["pruned"]["onnx"] is None:
            reason = (f"{pruned} has no ONNX export (no onnx/model.onnx): run faspx build --target all, or faspx "
                      "export --target onnx")
        runners = None
        prompts = {cell: np.random.default_rng(seed).integers(0, configs["dense"].vocab_size,
                                                               size=(cell[1], cell[0]), dtype=np.int64)
                   for cell in cells}
        if reason is None:
            try:
                runners, load = _load(backend, dirs, quantized, dev, prompts[cells[0]], new_tokens, max(prompt_lens),
                                      report, peaks, clock, bar)
            except Exception as err:
                if backend == "torch":
                    raise
                log.warning("%s could not load the models: %s", backend, err)
                reason = f"{backend} failed to load the models: {type(err).__name__}: {err}"
        if reason:
            report["skipped"].append({"backend": backend, "reason": reason})
            bar.update(per_backend)
            continue
        for length, batch in cells:
            try:
                report["results"].append(_measure(backend, runners, load, prompts[length, batch], new_tokens, repeats,
                                                  warmup, dev, configs_of, read_values, report, peaks, clock, bar))
            except torch.OutOfMemoryError:
                report["skipped"].append({"backend": backend, "batch": batch, "prompt_len": length,
                                          "reason": f"out of GPU memory at batch {batch}, prompt {length} "
                                                    "(both variants loaded)"})
                torch.cuda.empty_cache()
        for runner in runners.values():  # free both variants before the next backend loads
            if hasattr(runner, "close"):
                runner.close()
        runners.clear()
        memory.release_free_memory()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    report["process_peak_rss_bytes"] = peaks.overall()
    report["noise"] = noise_flags(report["results"], report["roofline"]["ideal_decode_speedup"],
                                  report["roofline"]["ideal_prefill_speedup"])
    if eval:
        report["perplexity"] = perplexities(dirs, tuple(eval_datasets), max_windows, dev, progress, quantized)
    if out is not None:
        from faspx.benchmarks.report import write_report

        with atomic_dir(out, force) as tmp:
            write_report(report, tmp)
        report["out"] = str(out)
    return report


def _quantization(onnx_dir: Path) -> dict | None:
    """How a quantized export was made (its config.json's ``faspx_quantization``)."""
    import json

    config = Path(onnx_dir) / "config.json"
    return json.loads(config.read_text()).get("faspx_quantization") if config.exists() else None


def _load(backend: str, dirs: dict, quantized: dict, dev: torch.device, ids: np.ndarray, new_tokens: int,
          max_prompt: int, report: dict, peaks: memory.RssPeaks, clock: Callable[[], float], bar):
    """Every variant's runner for ``backend`` (sized for ``max_prompt`` + ``new_tokens``; the quantized
    exports too in an ONNX backend) and the memory each added: loaded one after the other, each
    followed by one untimed generation of ``ids`` (weights paged in, buffers allocated)."""
    where: torch.device | str = dev
    sources = {name: dirs[name]["hf"] for name in VARIANTS}
    if backend in ONNX_BACKENDS:
        where, note = ort_device(dev) if backend == "onnxruntime" else ("cpu", None)
        if note:
            report["notes"].append(note)
        settings = onnx_settings(dirs["pruned"]["root"], dirs["pruned"]["onnx"])
        for name in VARIANTS:
            if dirs[name]["onnx"] is None:
                dirs[name]["onnx"], done = export_for_bench(dirs[name]["hf"], ONNX_CACHE, settings)
                v = done["validation"]
                report["notes"].append(
                    f"the {name} model had no ONNX export: faspx exported it ({done['exporter']} exporter, "
                    f"{'float16' if settings['fp16'] else 'float32'}, opset {settings['opset']}, the pruned export's "
                    f"settings) into {dirs[name]['onnx']}{' (cached from an earlier run)' if done['cached'] else ''}; "
                    f"max |logits diff| vs PyTorch {max(v['prefill_max_abs_diff'], v['decode_max_abs_diff']):.2e}")
                report[name]["onnx_dir"] = str(dirs[name]["onnx"])
            report[name]["disk_bytes"]["onnx"] = memory.disk_bytes(dirs[name]["onnx"], weights_only=True)
            report[name]["dir_bytes"]["onnx"] = memory.disk_bytes(dirs[name]["onnx"])
            report[name]["onnx_read_bytes"] = memory.onnx_read_bytes(dirs[name]["onnx"])
        sources = {**{name: dirs[name]["onnx"] for name in VARIANTS}, **quantized}
    runners, load = {}, {}
    for name, source in sources.items():
        memory.release_free_memory()
        rss = memory.rss_bytes()
        used = memory.cuda_used_bytes(dev) if dev.type == "cuda" else 0
        peaks.start()
        runners[name] = load_runner(backend, source, where, max_prompt + new_tokens)
        load[name] = {"rss_load_delta_bytes": memory.rss_bytes() - rss}
        if dev.type == "cuda":
            load[name]["cuda_load_delta_bytes"] = memory.cuda_used_bytes(dev) - used
        at_end = []
        runners[name].sample(ids, new_tokens, clock, lambda _state, at_end=at_end: at_end.append(memory.rss_bytes()))
        peak = peaks.stop()
        load[name]["rss_load_run_peak_bytes"] = (peak if peak is not None else max(at_end + [rss])) - rss
        if hasattr(runners[name], "held_memory"):  # a runtime in processes of its own (vLLM)
            load[name].update(runners[name].held_memory())
        bar.update(1)
    kinds = {runners[name].dtype for name in VARIANTS}  # the quantized ones differ on purpose
    if len(kinds) > 1:
        report["notes"].append(f"{backend}: dense and pruned run in different dtypes ({', '.join(sorted(kinds))}): "
                               "the ratio mixes pruning with precision")
    return runners, load


def _measure(backend: str, runners: dict, load: dict, ids: np.ndarray, new_tokens: int, repeats: int, warmup: int,
             dev: torch.device, configs: dict, read_values: dict, report: dict, peaks: memory.RssPeaks,
             clock: Callable[[], float], bar) -> dict:
    """One (backend, batch) cell: interleaved runs of every variant, their figures, memory and ratios
    (``ratios``: pruned/dense; with quantized variants also ``ratios_vs_dense`` and, from each graph's
    read bytes, ``ideal_vs_dense``)."""
    batch, prompt_len = ids.shape
    names = tuple(runners)
    torch_cuda = dev.type == "cuda" and backend == "torch"
    mem = {name: {"rss_run_peak_delta_bytes": 0} for name in names}
    if torch_cuda:
        for name in names:
            mem[name].update(cuda_peak_allocated_bytes=0, cuda_peak_reserved_bytes=0, cuda_peak_working_bytes=0)

    def timed(name: str):
        m = mem[name]
        before = memory.rss_bytes()
        at_end_rss = []
        if torch_cuda:
            torch.cuda.reset_peak_memory_stats(dev)
            allocated = torch.cuda.memory_allocated(dev)
        peaks.start()
        gc.disable()  # as timeit does: no collector pauses inside a timed generation
        try:
            sample = runners[name].sample(ids, new_tokens, clock, lambda _s: at_end_rss.append(memory.rss_bytes()))
        finally:
            gc.enable()
        peak = peaks.stop()
        peak = peak if peak is not None else max(at_end_rss + [before])
        m["rss_run_peak_delta_bytes"] = max(m["rss_run_peak_delta_bytes"], peak - before)
        if torch_cuda:
            top = torch.cuda.max_memory_allocated(dev)
            m["cuda_peak_allocated_bytes"] = max(m["cuda_peak_allocated_bytes"], top)
            m["cuda_peak_reserved_bytes"] = max(m["cuda_peak_reserved_bytes"], torch.cuda.max_memory_reserved(dev))
            m["cuda_peak_working_bytes"] = max(m["cuda_peak_working_bytes"], top - allocated)
        bar.update(1)
        return sample

    samples, order = interleave({name: (lambda n=name: timed(n)) for name in names}, repeats, warmup)
    kv_len = prompt_len + new_tokens - 1  # the last token is produced, never fed back
    entry = {"backend": backend, "device": runners["dense"].device, "dtype": runners["dense"].dtype, "batch": batch,
             "prompt_len": prompt_len, "new_tokens": new_tokens, "kv_cache_len": kv_len, "order": order,
             "variants": {}}
    for name in names:
        r = runners[name]
        m = {"weight_bytes": r.weight_bytes,
             "kv_cache_bytes": memory.kv_cache_bytes(configs[name], batch, kv_len, r.kv_bytes_per_value),
             "kv_bytes_per_token": memory.kv_bytes_per_token(configs[name], r.kv_bytes_per_value),
             **load[name], **mem[name]}
        entry["variants"][name] = {"figures": figures(samples[name], batch, prompt_len, new_tokens), "memory": m,
                                   "samples": [s.to_dict() for s in samples[name]]}
    entry["ratios"] = ratios(entry["variants"]["dense"]["figures"], entry["variants"]["pruned"]["figures"])
    entry["ideal_decode_speedup_with_kv"] = decode_bound(read_values, {n: configs[n] for n in VARIANTS}, batch,
                                                         prompt_len + (new_tokens - 1) / 2,
                                                         runners["dense"].kv_bytes_per_value)
    if len(names) > len(VARIANTS):
        dense = entry["variants"]["dense"]["figures"]
        entry["ratios_vs_dense"] = {n: ratios(dense, entry["variants"][n]["figures"]) for n in names[1:]}
        context = prompt_len + (new_tokens - 1) / 2
        kv = {n: batch * context * memory.kv_bytes_per_token(configs[n], runners[n].kv_bytes_per_value) for n in names}
        read = {n: report[n]["onnx_read_bytes"] for n in names}
        entry["ideal_vs_dense"] = {n: {"read_bytes_per_step": read[n], "decode": read["dense"] / read[n],
                                       "decode_with_kv": (read["dense"] + kv["dense"]) / (read[n] + kv[n])}
                                   for n in names[1:]}
    entry["process_peak_rss_bytes_so_far"] = peaks.overall()
    return entry


def perplexities(dirs: dict, datasets: tuple[str, ...], max_windows: int | None, device: torch.device,
                 progress: bool, quantized: dict | None = None) -> list[dict]:
    """Dense and pruned perplexity on each dataset: same tokens, same windows, fp32 in PyTorch; each
    quantized export's (``quantized``: name -> ONNX directory) on the same windows in onnxruntime."""
    from transformers import AutoTokenizer

    from faspx.data import eval_ids
    from faspx.eval import perplexity
    from faspx.models import load_hf

    tokenizer = None
    for name in VARIANTS:  # pruning leaves the tokenizer alone: the dense one's, else the pruned one's
        try:
            tokenizer = AutoTokenizer.from_pretrained(dirs[name]["hf"])
            break
        except Exception:  # noqa: BLE001 - no tokenizer files in that directory
            continue
    if tokenizer is None:
        raise UsageError("perplexity needs a tokenizer and neither model directory has one")
    ids = {dataset: eval_ids(tokenizer, dataset) for dataset in datasets}
    rows = [{"dataset": dataset, "max_windows": max_windows, "tokens": int(ids[dataset].numel())}
            for dataset in datasets]
    for name in VARIANTS:
        model = load_hf(dirs[name]["hf"], dtype=torch.float32)
        seqlen = min(2048, getattr(model.config, "max_position_embeddings", 2048))
        for row in rows:
            log.info("perplexity of the %s model on %s", name, row["dataset"])
            row[name] = perplexity(model, ids[row["dataset"]], seqlen, max_windows=max_windows, device=device,
                                   progress=progress)
            row["seqlen"] = seqlen
            row["windows"] = min(row["tokens"] // seqlen, max_windows or 10**12)
        del model
        gc.collect()
    for name, onnx_dir in (quantized or {}).items():
        from faspx.benchmarks.backends import ort_device
        from faspx.exporters.ort_runtime import OnnxDecoder

        decoder = OnnxDecoder(onnx_dir, device=ort_device(device)[0])
        for row in rows:
            log.info("perplexity of the %s graph on %s", name, row["dataset"])
            row[name] = perplexity(lambda x, d=decoder: torch.from_numpy(d.prefill(x.numpy())[0]), ids[row["dataset"]],
                                   row["seqlen"], max_windows=max_windows, progress=progress)
        del decoder
        gc.collect()
    return rows
