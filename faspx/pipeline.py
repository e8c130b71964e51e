"""The pipeline as a library: prune (+ distill), export and build, each returning a result.

``faspx.cli`` parses options, calls these and prints; a Python user calls them directly::

    result = prune_model("~/.cache/faspx/smollm2-135m", 0.3, "quality", calib="c4.parquet")
    built = build("facebook/opt-125m", 0.3, "out/opt", target="onnx")

Every check that needs no weights runs first (``check_prune``), so bad input costs no model load.
Outputs are written to a temporary directory and renamed when complete (``faspx.outputs.atomic_dir``).
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from faspx.checkpoint import Checkpoint, checkpoint_dir, model_stamp
from faspx.errors import FaspxError, UsageError
from faspx.outputs import FaspInfo, atomic_dir, check_out
from faspx.recipes import Recipe, get_recipe

log = logging.getLogger("faspx")
TARGETS = ("hf", "onnx", "all")


@dataclass
class PruneResult:
    """A pruned model in memory, its tokenizer, and its provenance (what fasp.json will hold)."""

    model: nn.Module
    tokenizer: object
    info: FaspInfo
    # the resume checkpoint the prune kept (removed once the output is written)
    checkpoint: Checkpoint | None = None

    def written(self) -> None:
        """The output is complete: its checkpoint is no longer needed."""
        if self.checkpoint is not None:
            self.checkpoint.remove()


@dataclass
class BuildResult:
    """What ``build`` wrote: the output directory, the provenance, and the benchmark report if asked."""

    out: Path
    info: FaspInfo
    bench: dict | None = None
    params_stored: int = 0


@dataclass(frozen=True)
class Quantization:
    """Quantized copies of the ONNX export (``OUT/onnx-int4``, ``OUT/onnx-int8``; see
    ``faspx.exporters.quantize``) and the text their perplexity and greedy agreement are checked on."""

    precisions: tuple[str, ...] = ()  # int4, int8, both; none: no quantized copy
    block_size: int = 32
    accuracy_level: int = 4
    dataset: str = "wikitext2"
    layout: str = "mixed"  # int4: which linears keep 8 bits (exporters.quantize.INT4_LAYOUTS)
    windows: int = 8

    def check(self, target: str) -> None:
        """UsageError before any work: settings, a target with an ONNX graph, the text."""
        from faspx.exporters.quantize import check_quantize

        if not self.precisions:
            return
        if len(set(self.precisions)) != len(self.precisions):
            raise UsageError(f"--quantize names a precision twice: {','.join(self.precisions)}")
        for precision in self.precisions:
            check_quantize(precision, self.block_size, self.accuracy_level, self.layout)
        if target == "hf":
            raise UsageError(f"--quantize {','.join(self.precisions)} quantizes the ONNX graph: use --target onnx "
                             "or all")
        check_eval(self.dataset, self.windows)


@dataclass(frozen=True)
class Calibration:
    """Where the calibration windows come from."""

    source: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0


def check_prune(model_name: str, sparsity: float, recipe: Recipe, calib: Calibration, device: str, dtype: str):
    """Every check of a prune that needs no weights; returns (config, adapter, device, dtype, seqlen)."""
    from faspx.budget import plan
    from faspx.data import check_text_source
    from faspx.models import load_config, meta_model
    from faspx.prune import check_ffn_widths, resolve_device, resolve_dtype

    if calib.nsamples < 1:
        raise UsageError(f"--nsamples must be at least 1 (got {calib.nsamples})")
    if calib.seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2 (got {calib.seqlen})")
    if recipe.distill > calib.nsamples:
        raise UsageError(f"--distill {recipe.distill} (recipe {recipe.name}) needs at least as many calibration "
                         f"windows (--nsamples {calib.nsamples}): raise --nsamples, or lower --distill (0: none)")
    if recipe.structure == "2ssp" and recipe.depth_samples > calib.nsamples:
        raise UsageError(f"the attention search of recipe {recipe.name} scores {recipe.depth_samples} calibration "
                         f"windows but --nsamples is {calib.nsamples}: raise --nsamples or lower depth_samples")
    check_text_source(calib.source, "--calib")
    config, adapter = load_config(model_name)
    plan(meta_model(config), adapter, sparsity, recipe.structure, recipe.alpha)
    check_ffn_widths(config, adapter, recipe)
    dev = resolve_device(device)
    fwd_dtype = resolve_dtype(dtype, dev)
    seqlen = min(calib.seqlen, getattr(config, "max_position_embeddings", calib.seqlen))
    return config, adapter, dev, fwd_dtype, seqlen


def prune_checkpoint(out: Path, model_name: str, sparsity: float, recipe: Recipe, calib: Calibration,
                     device: torch.device, dtype: torch.dtype, resume: bool) -> Checkpoint | None:
    """The resume checkpoint of output ``out`` (``--resume``), checked against this command; without
    ``resume``, None, and a word about a checkpoint an interrupted run left."""
    from faspx import __version__

    directory = checkpoint_dir(out)
    if not resume:
        if directory.exists():
            log.warning("an interrupted run left a checkpoint in %s: pass --resume to go on from it (this run "
                        "starts over and removes it when done)", directory)
        return None
    source = Path(calib.source).expanduser()
    calib_key = {"source": calib.source, "nsamples": calib.nsamples, "seqlen": calib.seqlen, "seed": calib.seed}
    if source.is_file():
        calib_key["file"] = [str(source.resolve()), source.stat().st_size, source.stat().st_mtime_ns]
    key = {"model": model_stamp(model_name), "sparsity": sparsity, "recipe": recipe.to_dict(),
           "calibration": calib_key, "device": str(device), "dtype": str(dtype), "faspx": __version__}
    checkpoint = Checkpoint(directory, key)
    checkpoint.check()
    return checkpoint


def prune_model(model_name: str, sparsity: float, recipe: Recipe | str | None = None, *,
                calib: Calibration = Calibration(), device: str = "auto", dtype: str = "auto",
                progress: bool = True, out: Path | None = None, resume: bool = False) -> PruneResult:
    """Load ``model_name``, calibrate, prune with ``recipe`` (default ``quality``) and distil if it says so.

    With ``resume``, a checkpoint beside ``out`` (the output this prune is for) keeps every pruned layer,
    and a rerun after an interruption continues from it (``faspx.checkpoint``).

    Example:
        >>> result = prune_model("~/.cache/faspx/smollm2-135m", 0.2, "fast")  # doctest: +SKIP
        >>> result.info.prune["removed_fraction"]  # doctest: +SKIP
        0.2
    """
    from faspx.data import calibration_ids
    from faspx.distill import distill
    from faspx.models import load_model, load_tokenizer, revision
    from faspx.prune import prune

    recipe = get_recipe(recipe)
    config, adapter, dev, fwd_dtype, seqlen = check_prune(model_name, sparsity, recipe, calib, device, dtype)
    if resume and out is None:
        raise UsageError("resume needs the output path (out) its checkpoint belongs to")
    checkpoint = prune_checkpoint(out, model_name, sparsity, recipe, calib, dev, fwd_dtype, resume) if out else None
    # The calibration windows first: text too short for them costs no model load.
    tokenizer = load_tokenizer(model_name)
    log.info("calibration: %d x %d tokens of %s", calib.nsamples, seqlen, calib.source)
    calib_ids = calibration_ids(tokenizer, calib.source, calib.nsamples, seqlen, calib.seed)
    log.info("loading %s", model_name)
    model, _, _ = load_model(model_name)
    # The teacher of distillation, kept in the forward dtype (distill copies it again only to move it to a GPU).
    dense = copy.deepcopy(model).to(dtype=fwd_dtype) if recipe.distill else None
    log.info("pruning %d layers on %s in %s with recipe %s", len(adapter.layers(model)), dev, fwd_dtype, recipe.name)
    report = prune(model, calib_ids, sparsity, recipe, device=dev, dtype=fwd_dtype, progress=progress,
                   checkpoint=checkpoint)
    info = FaspInfo(
        source_model=model_name, form=report.form, revision=revision(model), architecture=adapter.family,
        model_type=config.model_type, sparsity=sparsity, recipe=recipe.to_dict(),
        calibration={"source": calib.source, "nsamples": calib.nsamples, "seqlen": seqlen, "seed": calib.seed},
        prune=report.to_dict(), timings={"prune_s": report.seconds},
    )
    if recipe.distill:
        log.info("distilling from the dense model on %d calibration windows", recipe.distill)
        done = distill(model, dense, calib_ids, recipe.distill, lr=recipe.distill_lr,
                       step_tokens=recipe.distill_step_tokens, device=dev, dtype=fwd_dtype, progress=progress)
        info.distill, info.timings["distill_s"] = done.to_dict(), done.seconds
        del dense
    info.params = param_counts(model, adapter)
    stale = checkpoint_dir(out) if out is not None and checkpoint is None and checkpoint_dir(out).exists() else None
    return PruneResult(model, tokenizer, info, checkpoint or (Checkpoint(stale, {}) if stale else None))


def param_counts(model: nn.Module, adapter) -> dict:
    """Parameters actually stored, and the decoder linear weights that are stored and non-zero."""
    stored = sum(p.numel() for p in model.parameters())
    linear = [m.weight for layer in adapter.layers(model) for m in layer.modules() if isinstance(m, nn.Linear)]
    return {
        "stored": stored,
        "decoder_linear_stored": sum(w.numel() for w in linear),
        "decoder_linear_nonzero": sum(int(w.count_nonzero()) for w in linear),
    }


def save_pruned(result: PruneResult, out: Path, force: bool = False) -> dict:
    """Write a pruned model as one HF directory (``faspx prune``'s output), in the model's own dtype."""
    from faspx.exporters.hf import export_hf

    with atomic_dir(out, force) as tmp:
        summary = export_hf(result.model, result.tokenizer, tmp, result.info, dtype="auto")
    result.written()
    return summary


def export_targets(model: nn.Module, tokenizer, out: Path, target: str, info: FaspInfo, *,
                   hf_dtype: str = "float32", fp16: bool = False, opset: int = 18, exporter: str = "auto",
                   atol: float | None = None, quantization: Quantization = Quantization(),
                   progress: bool = False) -> dict:
    """Write OUT/hf and/or OUT/onnx (validated against ``model``), and OUT/onnx-int4|int8 when
    ``quantization`` asks (each checked against OUT/onnx); return their summaries."""
    from faspx.exporters.hf import export_hf
    from faspx.exporters.onnx import export_onnx, validate_onnx

    results: dict = {}
    if target in ("hf", "all"):
        results["hf"] = export_hf(model, tokenizer, out / "hf", info, dtype=hf_dtype)
    if target in ("onnx", "all"):
        model = model.float()  # the graph and its validation are traced in float32 (fp16 is a cast)
        chosen = auto_exporter(model, tokenizer, fp16, opset) if exporter == "auto" else exporter
        if chosen == "builder":
            from faspx.exporters.builder import export_builder

            log.info("writing the ONNX graph with onnxruntime-genai's model builder")
            try:
                results["onnx"] = export_builder(model, tokenizer, out / "onnx", info, progress=progress)
            except FaspxError as err:
                if exporter != "auto":
                    raise
                log.warning("onnxruntime-genai's builder failed (%s): tracing with torch.onnx instead", err)
                shutil.rmtree(out / "onnx", ignore_errors=True)
                chosen = "auto"
        if chosen != "builder":
            log.info("exporting the ONNX graph")
            results["onnx"] = export_onnx(model, tokenizer, out / "onnx", info, fp16=fp16, opset=opset,
                                          exporter=chosen, progress=progress)
        batch = 1 if chosen == "builder" else 3  # the builder's fused attention takes no left padding
        log.info("validating the ONNX graph against PyTorch")
        results["validation"] = validate_onnx(out / "onnx", model, atol=atol, batch=batch, progress=progress)
    if quantization.precisions:
        results["quantized"] = quantize_export(out, tokenizer, quantization, model.config, progress)
    return results


def auto_exporter(model: nn.Module, tokenizer, fp16: bool, opset: int) -> str:
    """What ``--exporter auto`` runs: onnxruntime-genai's builder where it can write the model (seconds,
    fused attention; it reads the tokenizer), else torch.onnx (dynamo, TorchScript if that fails),
    with the reason logged."""
    from faspx.exporters.builder import builder_reason
    from faspx.exporters.onnx import DEFAULT_OPSET

    reason = (f"--opset {opset}" if opset != DEFAULT_OPSET else "no tokenizer" if tokenizer is None
              else builder_reason(model, fp16))
    if reason is None:
        return "builder"
    log.info("--exporter auto: not onnxruntime-genai's builder (%s): tracing with torch.onnx", reason)
    return "auto"


def quantize_export(out: Path, tokenizer, quantization: Quantization, config, progress: bool) -> dict:
    """OUT/onnx-{precision} from OUT/onnx for each precision asked, each checked against OUT/onnx:
    {precision: {'summary', 'check'}}, also kept in OUT/onnx-{precision}/quantization.json."""
    from faspx.data import eval_ids
    from faspx.exporters.quantize import quantize_onnx, validate_quantized
    from faspx.outputs import write_json

    q = quantization
    if tokenizer is None:
        raise UsageError("checking a quantized graph needs the model's tokenizer (its perplexity on text)")
    ids = eval_ids(tokenizer, q.dataset)
    seqlen = min(2048, getattr(config, "max_position_embeddings", 2048), ids.numel())
    done = {}
    for precision in q.precisions:
        target = out / f"onnx-{precision}"
        target.mkdir()
        log.info("quantizing the ONNX graph to %s (block %d, accuracy level %d)", precision, q.block_size,
                 q.accuracy_level)
        summary = quantize_onnx(out / "onnx", target, precision, q.block_size, q.accuracy_level, layout=q.layout)
        log.info("checking the %s graph against the float32 one: perplexity on %s, greedy agreement", precision,
                 q.dataset)
        check = validate_quantized(target, out / "onnx", ids, seqlen, windows=q.windows, progress=progress)
        check["dataset"] = q.dataset
        write_json(target / "quantization.json", {"quantization": summary, "check": check})
        done[precision] = {"summary": summary, "check": check}
    return done


def check_export(target: str, atol: float | None = None, opset: int = 18, exporter: str = "auto",
                 config=None, stock: bool = True, fp16: bool = False) -> None:
    """The export checks that need no weights: the target, the validation bound, the opset, and (with
    ``config``) whether the builder can write the model."""
    from faspx.exporters.onnx import check_opset

    if target not in TARGETS:
        raise UsageError(f"target {target!r} is not one of {', '.join(TARGETS)}")
    if atol is not None and not atol > 0:
        raise UsageError(f"--atol must be > 0 (got {atol})")
    if target != "hf":
        check_opset(opset, exporter)
    if exporter == "builder" and target != "hf":
        from faspx.exporters.builder import builder_unsupported

        if fp16:
            raise UsageError("--exporter builder writes float32 here (its fp16 graphs are for CUDA): drop --fp16")
        reason = builder_unsupported(config, stock) if config is not None else None
        if reason:
            raise UsageError(f"--exporter builder: {reason}")


def check_eval(dataset: str, windows: int | None, seqlen: int = 2048) -> None:
    """The perplexity checks that need no model: the text source, the window count and length."""
    from faspx.data import check_text_source

    if windows is not None and windows < 1:
        raise UsageError(f"--eval-windows/--max-windows must be at least 1 (got {windows}); leave it out for all")
    if seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2 (got {seqlen}): a window predicts its tokens 2..N")
    check_text_source(dataset, "the evaluation dataset")


def eval_seqlen(positions: int | None, seqlen: int) -> int:
    """``seqlen`` capped at the model's max positions (logged when it is)."""
    if positions and seqlen > positions:
        log.info("--seqlen %d is above the model's %d positions: windows of %d", seqlen, positions, positions)
        return positions
    return seqlen


def export(model_name: str, out: Path, target: str = "all", *, dtype: str = "auto", fp16: bool = False,
           opset: int = 18, exporter: str = "auto", atol: float | None = None,
           quantization: Quantization = Quantization(), force: bool = False, progress: bool = False) -> tuple:
    """``faspx export``: an existing model directory (pruned or not) to OUT/hf and/or OUT/onnx.

    Returns (model, FaspInfo, the exports' summaries).
    """
    from faspx.exporters.hf import DTYPES
    from faspx.models import load_config, load_model

    check_export(target, atol, opset, exporter, fp16=fp16)
    quantization.check(target)
    config, _ = load_config(model_name)  # a directory without config.json is a UsageError here
    check_export(target, atol, opset, exporter, config, fp16=fp16)
    check_out(out, force)
    source_dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    hf_dtype = dtype if dtype != "auto" else source_dtype if source_dtype in DTYPES else "float32"
    info = FaspInfo.of_dir(model_name) if Path(model_name).expanduser().is_dir() else None
    if info is None:
        log.info("%s has no fasp.json: recording it as an unpruned source", model_name)
        info = FaspInfo(source_model=model_name, form="dense", pruned=False)
    log.info("loading %s", model_name)
    # The ONNX graph and its validation run in float32; an HF-only export keeps the checkpoint's dtype.
    model, tokenizer, _ = load_model(model_name, dtype=torch.float32 if target != "hf" else "auto")
    with atomic_dir(out, force) as tmp:
        results = export_targets(model, tokenizer, tmp, target, info, hf_dtype=hf_dtype, fp16=fp16,
                                 opset=opset, exporter=exporter, atol=atol, quantization=quantization,
                                 progress=progress)
    return model, info, results


def build(model_name: str, sparsity: float, out: Path, recipe: Recipe | str | None = None, *,
          calib: Calibration = Calibration(), target: str = "all", device: str = "auto", dtype: str = "auto",
          save_dtype: str = "float32", fp16: bool = False, atol: float | None = None,
          eval_dataset: str | None = None, eval_windows: int | None = None, eval_tasks: tuple[str, ...] = (),
          eval_limit: int | None = None, tasks_dir: str | None = None, bench: bool = False,
          quantization: Quantization = Quantization(), exporter: str = "auto", force: bool = False,
          progress: bool = True, command: str = "", resume: bool = False) -> BuildResult:
    """Prune, export and validate in one go: OUT/hf, OUT/onnx, OUT/fasp.json, OUT/build.log.

    ``eval_dataset`` adds dense and pruned perplexity; ``eval_tasks`` dense and pruned zero-shot
    accuracy (first ``eval_limit`` rows of each task; the dense scores cached) into fasp.json and
    OUT/zeroshot.md; ``bench`` then benchmarks dense vs pruned into OUT/bench. ``command`` is logged
    first in build.log. ``resume``: see ``prune_model``.

    Example:
        >>> built = build("~/.cache/faspx/smollm2-135m", 0.3, Path("out/x"), target="hf")  # doctest: +SKIP
    """
    recipe = get_recipe(recipe)
    check_export(target, atol, exporter=exporter, fp16=fp16)
    if exporter == "builder":
        from faspx.models import load_config

        check_export(target, atol, exporter=exporter, config=load_config(model_name)[0], stock=recipe.stock, fp16=fp16)
    quantization.check(target)
    if eval_dataset:
        check_eval(eval_dataset, eval_windows)
    if eval_tasks:
        from faspx.tasks import check_tasks_dir
        from faspx.zeroshot import require_lm_eval

        tasks_root = check_tasks_dir(eval_tasks, tasks_dir)
        require_lm_eval()
    check_prune(model_name, sparsity, recipe, calib, device, dtype)
    check_out(out, force)
    start = time.perf_counter()
    with atomic_dir(out, force) as tmp:
        # build.log keeps every step at INFO level, whatever -q says for the terminal.
        handler = logging.FileHandler(tmp / "build.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(min(log.getEffectiveLevel(), logging.INFO))
        try:
            if command:
                log.info("%s", command)
            result = prune_model(model_name, sparsity, recipe, calib=calib, device=device, dtype=dtype,
                                 progress=progress, out=out, resume=resume)
            info, model = result.info, result.model
            t = time.perf_counter()
            info.exports = export_targets(model, result.tokenizer, tmp, target, info, hf_dtype=save_dtype,
                                          fp16=fp16, atol=atol, exporter=exporter, quantization=quantization,
                                          progress=progress)
            info.timings["export_s"] = time.perf_counter() - t
            if eval_dataset:
                info.eval = evaluate_both(model_name, model, eval_dataset, eval_windows, device, dtype, progress)
            if eval_tasks:
                from faspx.zeroshot import markdown

                info.zeroshot = zeroshot_both(model_name, model, result.tokenizer, eval_tasks, tasks_root,
                                              eval_limit, device, dtype, progress)
                (tmp / "zeroshot.md").write_text(markdown(info.zeroshot["table"], eval_limit,
                                                          info.zeroshot["differences"]))
            info.write(tmp / "fasp.json")
            log.info("done in %.1fs", time.perf_counter() - start)
        finally:
            log.removeHandler(handler)
            handler.close()
    result.written()
    built = BuildResult(out, info, params_stored=sum(p.numel() for p in model.parameters()))
    if bench:
        from faspx.benchmarks.report import write_report
        from faspx.benchmarks.run import run_bench
        from faspx.models import local_dir

        backends = ("torch", "onnxruntime") if target != "hf" else ("torch",)
        positions = getattr(model.config, "max_position_embeddings", 4096)
        built.bench = run_bench(local_dir(model_name), out, backends=backends, device=device, batches=(1,),
                                prompt_len=min(128, positions // 2), new_tokens=min(64, positions // 4),
                                repeats=3, progress=progress)
        with atomic_dir(out / "bench") as tmp:
            write_report(built.bench, tmp)
    return built


def load_any(model_name: str, dtype: torch.dtype | str = "auto") -> tuple[nn.Module, object]:
    """A model to run (eval, generate): stock, or a faspx nemotron-nas output (dispatched on its fasp.json)."""
    from faspx.models import load_model, output_form, resolve

    source, _ = resolve(model_name)
    if output_form(source) == "nemotron-nas":
        from faspx.exporters.hf import load_nas

        return load_nas(source, dtype=dtype)
    model, tokenizer, _ = load_model(model_name, dtype=dtype)
    return model, tokenizer


def evaluate_both(dense_name: str, pruned: nn.Module, dataset: str, windows: int | None, device: str,
                  dtype: str, progress: bool) -> dict:
    """Perplexity of the dense source and of the pruned model, same windows, same settings, in the
    forward dtype of the prune (``auto``: bf16 on CUDA, fp32 on the CPU)."""
    from faspx.data import eval_ids
    from faspx.eval import perplexity
    from faspx.models import load_model
    from faspx.prune import resolve_device, resolve_dtype

    dev = resolve_device(device)
    eval_dtype = resolve_dtype(dtype, dev)
    dense, tokenizer, _ = load_model(dense_name, dtype=eval_dtype)
    ids = eval_ids(tokenizer, dataset)
    seqlen = min(2048, getattr(dense.config, "max_position_embeddings", 2048))
    log.info("perplexity of the dense model")
    dense_ppl = perplexity(dense, ids, seqlen, max_windows=windows, device=dev, progress=progress)
    del dense
    log.info("perplexity of the pruned model")
    pruned_ppl = perplexity(copy.deepcopy(pruned).to(eval_dtype), ids, seqlen, max_windows=windows, device=dev,
                            progress=progress)
    return {"dataset": dataset, "seqlen": seqlen, "windows": min(ids.numel() // seqlen, windows or 10**9),
            "dtype": str(eval_dtype).removeprefix("torch."), "dense": dense_ppl, "pruned": pruned_ppl}


def zeroshot_both(dense_name: str, pruned: nn.Module, tokenizer, tasks: tuple[str, ...], root: Path | str,
                  limit: int | None, device: str, dtype: str, progress: bool) -> dict:
    """Zero-shot accuracy of the dense source (cached per model and task set) and of the pruned model,
    same tasks and rows, in the forward dtype of the prune; the table of both."""
    from faspx.prune import resolve_device, resolve_dtype
    from faspx.zeroshot import evaluate, hf_lm, score_model, table

    dev = resolve_device(device)
    eval_dtype = resolve_dtype(dtype, dev)
    dense = score_model(dense_name, tasks, root, limit, device=str(dev), dtype=str(eval_dtype).removeprefix("torch."),
                        use_cache=True, progress=progress)
    log.info("zero-shot tasks %s on the pruned model", ",".join(tasks))
    model = copy.deepcopy(pruned).to(device=dev, dtype=eval_dtype).eval()
    pruned_scores = evaluate(hf_lm(model, tokenizer), tasks, root, limit, progress=progress)
    differences = {t: e["differs_from_lm_eval"] for t, e in pruned_scores["tasks"].items()
                   if "differs_from_lm_eval" in e}
    return {"tasks": list(tasks), "limit": limit, "dtype": str(eval_dtype).removeprefix("torch."),
            "dense": dense, "pruned": pruned_scores, "table": table(dense, pruned_scores), "differences": differences}

