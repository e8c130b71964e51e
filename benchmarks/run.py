"""run_bench: dense vs pruned, per backend and batch size, interleaved, into one report dict."""

from __future__ import annotations

import hashlib
import logging
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks import memory
from benchmarks.backends import BACKENDS, RUNNERS, unavailable
from benchmarks.timing import figures, interleave
from faspx.errors import UsageError

log = logging.getLogger("faspx")
VARIANTS = ("dense", "pruned")
ONNX_CACHE = Path.home() / ".cache" / "faspx" / "bench-onnx"


def variant_dirs(dense: Path, pruned: Path) -> dict[str, dict[str, Path | None]]:
    """Where each variant's HF checkpoint and ONNX export are. ``pruned`` may be a faspx build
    output (hf/ and onnx/ inside) or a plain HF directory; so may ``dense``."""
    dirs = {}
    for name, path in (("dense", Path(dense).expanduser()), ("pruned", Path(pruned).expanduser())):
        hf = path / "hf" if (path / "hf" / "config.json").exists() else path
        if not (hf / "config.json").exists():
            raise UsageError(f"{path} holds no HF model (no config.json, no hf/config.json)")
        onnx = next((d for d in (path / "onnx", path) if (d / "model.onnx").exists()), None)
        dirs[name] = {"hf": hf, "onnx": onnx}
    return dirs


def dense_onnx(hf_dir: Path, progress: bool) -> Path:
    """An ONNX export of a model that has none, cached by path and modification time."""
    from exporters.onnx import export_onnx
    from faspx.models import load_model
    from faspx.outputs import atomic_dir

    key = hashlib.sha1(f"{hf_dir.resolve()}:{(hf_dir / 'config.json').stat().st_mtime}".encode()).hexdigest()[:12]
    target = ONNX_CACHE / key
    if not (target / "model.onnx").exists():
        log.info("exporting %s to ONNX for the onnxruntime backend (cached in %s)", hf_dir, target)
        model, tokenizer, _ = load_model(str(hf_dir), dtype=torch.float32)
        with atomic_dir(target, force=True) as tmp:
            export_onnx(model, tokenizer, tmp, None)
    return target


def roofline(dirs: dict) -> dict:
    """Ideal batch-1 decode speedup: decode is bound by reading the weights, so it is the ratio of
    the weight bytes each decode step reads (zeroed-but-stored weights count: they are read)."""
    from faspx.models import meta_model

    read = {}
    for name, d in dirs.items():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(d["hf"])
        dtype = getattr(config, "dtype", None) or torch.float32
        model = meta_model(config).to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        read[name] = memory.decode_read_bytes(model)
    return {"dense_read_bytes": read["dense"], "pruned_read_bytes": read["pruned"],
            "ideal_decode_speedup": read["dense"] / read["pruned"]}


def environment(device: torch.device) -> dict:
    import onnxruntime
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {
        "command": " ".join(["faspx", *sys.argv[1:]]) if sys.argv and "faspx" in sys.argv[0] else " ".join(sys.argv),
        "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
        "cpu_threads": torch.get_num_threads(), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run_bench(dense: str | Path, pruned: str | Path, *, backends: tuple[str, ...] = ("torch", "onnxruntime"),
              device: str = "auto", batches: tuple[int, ...] = (1, 8), prompt_len: int = 128,
              new_tokens: int = 128, repeats: int = 5, warmup: int = 1, eval_sets: tuple[str, ...] = (),
              max_windows: int | None = None, progress: bool = True, seed: int = 0,
              clock: Callable[[], float] = time.perf_counter) -> dict:
    """Measure dense and pruned in one run and return the report (every raw sample included).

    Example:
        >>> report = run_bench("smollm2", "out/demo", backends=("torch",), batches=(1,))  # doctest: +SKIP
    """
    from faspx.prune import resolve_device

    if new_tokens < 2 or prompt_len < 1 or repeats < 1 or min(batches) < 1:
        raise UsageError("need --new-tokens >= 2, --prompt-len >= 1, --repeats >= 1 and batch sizes >= 1")
    for backend in backends:
        if backend not in BACKENDS:
            raise UsageError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    dev = resolve_device(device)
    dirs = variant_dirs(Path(dense), Path(pruned))
    max_positions = getattr(_config(dirs["dense"]["hf"]), "max_position_embeddings", None)
    if max_positions and prompt_len + new_tokens > max_positions:
        raise UsageError(f"--prompt-len + --new-tokens = {prompt_len + new_tokens} exceeds the model's "
                         f"{max_positions} positions")
    report: dict = {"environment": environment(dev), "settings": {
        "dense": str(dense), "pruned": str(pruned), "backends": list(backends), "batches": list(batches),
        "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup, "seed": seed},
        "results": [], "skipped": [], "notes": [], "roofline": roofline(dirs)}
    for name, d in dirs.items():
        report[name] = {"hf_dir": str(d["hf"]), "disk_bytes": {"hf": memory.disk_bytes(d["hf"])}}

    total = len(backends) * len(batches) * (warmup + repeats) * 2
    bar = tqdm(total=total, desc="benchmark", unit="run", disable=not progress)
    for backend in backends:
        reason = unavailable(backend, dev)
        if reason is None and backend == "onnxruntime" and dirs["pruned"]["onnx"] is None:
            reason = f"{pruned} has no ONNX export (run faspx build --target all, or faspx export --target onnx)"
        if reason:
            report["skipped"].append({"backend": backend, "reason": reason})
            bar.update(len(batches) * (warmup + repeats) * 2)
            continue
        runners, load = {}, {}
        for name in VARIANTS:
            source = dirs[name]["hf"]
            if backend == "onnxruntime":
                if dirs[name]["onnx"] is None:
                    dirs[name]["onnx"] = dense_onnx(dirs[name]["hf"], progress)
                    report["notes"].append(f"the {name} model had no ONNX export: faspx exported it to "
                                           f"{dirs[name]['onnx']} for this run")
                source = dirs[name]["onnx"]
                report[name]["disk_bytes"]["onnx"] = memory.disk_bytes(source)
            before = memory.rss_bytes()
            runners[name] = RUNNERS[backend](source, dev)
            load[name] = memory.rss_bytes() - before
        vocab = _config(dirs["dense"]["hf"]).vocab_size
        for batch in batches:
            ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, prompt_len), dtype=np.int64)
            peaks = {name: 0 for name in VARIANTS}

            def timed(name, ids=ids, peaks=peaks, runners=runners):
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                    base = torch.cuda.memory_allocated(dev)
                sample = runners[name].sample(ids, new_tokens, clock)
                if dev.type == "cuda":
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(dev) - base)
                bar.update(1)
                return sample

            samples, order = interleave({name: (lambda n=name: timed(n)) for name in VARIANTS}, repeats, warmup)
            entry = {"backend": backend, "device": str(dev), "batch": batch, "order": order, "variants": {}}
            for name in VARIANTS:
                kv = memory.kv_cache_bytes(_config(dirs[name]["hf"]), batch, prompt_len + new_tokens,
                                           runners[name].kv_bytes_per_value)
                entry["variants"][name] = {
                    "figures": figures(samples[name], batch, prompt_len, new_tokens),
                    "memory": {"rss_load_delta_bytes": load[name], "kv_cache_bytes": kv,
                               **({"cuda_peak_working_bytes": peaks[name]} if dev.type == "cuda" else {})},
                    "samples": [s.to_dict() for s in samples[name]],
                }
            entry["ratios"] = {key: entry["variants"]["pruned"]["figures"][key]["median"]
                               / entry["variants"]["dense"]["figures"][key]["median"]
                               for key in entry["variants"]["dense"]["figures"]}
            report["results"].append(entry)
        runners.clear()  # free both variants before the next backend loads
    bar.close()
    report["peak_rss_bytes"] = memory.peak_rss_bytes()
    if eval_sets:
        report["perplexity"] = perplexities(dirs, eval_sets, max_windows, dev, progress)
    return report


def _config(hf_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(hf_dir)


def perplexities(dirs: dict, datasets: tuple[str, ...], max_windows: int | None, device: torch.device,
                 progress: bool) -> list[dict]:
    """Dense and pruned perplexity on each dataset, same windows, fp32."""
    from faspx.data import eval_ids
    from faspx.eval import perplexity
    from faspx.models import load_model

    rows = []
    for dataset in datasets:
        row = {"dataset": dataset, "max_windows": max_windows}
        for name, d in dirs.items():
            model, tokenizer, _ = load_model(str(d["hf"]), dtype=torch.float32)
            ids = eval_ids(tokenizer, dataset)
            seqlen = min(2048, getattr(model.config, "max_position_embeddings", 2048))
            row[name] = perplexity(model, ids, seqlen, max_windows=max_windows, device=device, progress=progress)
            row["seqlen"] = seqlen
        rows.append(row)
    return rows
