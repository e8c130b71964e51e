"""The ``faspx`` command line: prune, eval (and the later stages' commands)."""

from __future__ import annotations

import copy
import functools
import logging
import sys
import time
from pathlib import Path

import click
import torch

from faspx.distill import STEP_TOKENS
from faspx.errors import FaspxError, UsageError

log = logging.getLogger("faspx")


def verbosity(fn):
    """-q/-v on every command; errors become one line and an exit code unless -v."""

    @click.option("-q", "--quiet", is_flag=True, help="No progress bars or log lines.")
    @click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
    @functools.wraps(fn)
    def wrapper(*args, quiet: bool, verbose: bool, **kwargs):
        level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
        logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
        logging.getLogger().handlers[0].setLevel(level)  # a file log may lower the faspx logger's level
        for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        if quiet:
            import transformers

            transformers.utils.logging.disable_progress_bar()
            transformers.utils.logging.set_verbosity_error()
        try:
            return fn(*args, progress=not quiet, **kwargs)
        except click.exceptions.Exit:
            raise
        except FaspxError as err:  # UsageError included: exit 2
            _fail(err, verbose, err.exit_code)
        except torch.OutOfMemoryError as err:
            _fail(FaspxError("out of memory: lower --nsamples/--seqlen, use --dtype bfloat16, or "
                             "--device cpu"), verbose, 1, cause=err)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was written", err=True)
            sys.exit(1)
        except Exception as err:  # noqa: BLE001 - anything unforeseen still gets one line
            _fail(FaspxError(f"{type(err).__name__}: {err} (run with -v for the traceback)"), verbose, 1,
                  cause=err)

    return wrapper


def _fail(err: Exception, verbose: bool, code: int, cause: Exception | None = None) -> None:
    if verbose:
        import traceback

        traceback.print_exception(cause or err)
    click.echo(f"error: {err}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="faspx")
def main() -> None:
    """FASP structured pruning for LLMs, with stock HF and ONNX exports."""


def prune_options(fn):
    """The pruning options shared by ``prune`` and ``build``."""
    options = [
        click.option("--model", "model_name", required=True, help="Hub id or local model directory."),
        click.option("--sparsity", type=float, required=True,
                     help="Fraction of the decoder's linear weights to remove."),
        click.option("--structure", type=click.Choice(["fasp", "mlp", "auto"]), default="fasp", show_default=True,
                     help="fasp: FFN + V/O pairs at one ratio (the paper); mlp: the whole budget in the FFN; "
                          "auto: the attention/FFN split that moves the last layer's output least (measured)."),
        click.option("--calib", default="wikitext2", show_default=True,
                     help="Calibration text: wikitext2, c4, or a .txt/.jsonl/.parquet file."),
        click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration windows."),
        click.option("--seqlen", type=int, default=2048, show_default=True,
                     help="Tokens per window (capped at the model's max positions)."),
        click.option("--no-restore", is_flag=True, help="Skip the least-squares restoration (structured Wanda)."),
        click.option("--damp", default="0.01", show_default=True,
                     help="Restoration damping relative to mean(diag G[M,M]), or 'auto': chosen per matrix "
                          "on held-out calibration samples."),
        click.option("--selection", type=click.Choice(["wanda", "obs"]), default="wanda", show_default=True,
                     help="wanda: the paper's score; obs: restoration-aware (structured OBS)."),
        click.option("--restore-target", type=click.Choice(["pruned", "dense"]), default="pruned",
                     show_default=True,
                     help="Restore towards W X on the pruned model's inputs (paper) or the dense model's."),
        click.option("--bias", is_flag=True,
                     help="Bias-aware restoration: solve a bias shift with W* (OPT; LLaMA via its bias fields)."),
        click.option("--no-guard", is_flag=True,
                     help="Accept a restoration even where it raises the layer's error (the paper as written)."),
        click.option("--ffn-widths", type=click.Choice(["uniform", "per-layer"]), default="uniform",
                     show_default=True,
                     help="per-layer (LLaMA, opt-in): share the FFN budget between layers by measured error, widths "
                          "in steps of 256; written in the nemotron-nas form vLLM serves, NOT loadable by stock "
                          "LlamaForCausalLM (transformers needs trust_remote_code=True); --target hf only."),
        click.option("--distill", type=click.IntRange(min=0), default=0, show_default=True,
                     help="After pruning, distil from the dense model on the first N calibration windows "
                          "(AdamW steps of --distill-step-tokens tokens; needs the whole model twice on the device)."),
        click.option("--distill-lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
                     help="Peak learning rate of --distill (decays linearly to 0)."),
        click.option("--distill-step-tokens", type=click.IntRange(min=1), default=STEP_TOKENS, show_default=True,
                     help="Tokens per --distill step: each window is cut into pieces this long."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--dtype", default="auto", show_default=True,
                     help="Forward dtype while pruning: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration sample."),
        click.option("--force", is_flag=True, help="Replace --out if it exists."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def run_prune(model_name: str, sparsity: float, structure: str, calib: str, nsamples: int, seqlen: int,
              no_restore: bool, damp: str, selection: str, restore_target: str, bias: bool, no_guard: bool,
              ffn_widths: str, distill: int, distill_lr: float, distill_step_tokens: int, device: str, dtype: str,
              seed: int, progress: bool):
    """Check the input, load the model, calibrate and prune. Returns (model, tokenizer, fasp_json)."""
    from faspx.budget import plan
    from faspx.data import calibration_ids
    from faspx.distill import distill as run_distill
    from faspx.models import load_config, load_model, meta_model, revision
    from faspx.outputs import provenance
    from faspx.prune import check_ffn_widths, prune, resolve_device, resolve_dtype

    config, adapter = load_config(model_name)
    # Cheap checks first: a bad sparsity must not cost a model load.
    plan(meta_model(config), adapter, sparsity, structure)
    check_ffn_widths(config, adapter, ffn_widths)
    if damp != "auto":
        try:
            damp = float(damp)
        except ValueError:
            raise UsageError(f"--damp must be a number >= 0 or 'auto' (got {damp!r})") from None
        if damp < 0:
            raise UsageError(f"--damp must be >= 0 (got {damp})")
    if distill > nsamples:
        raise UsageError(f"--distill {distill} needs at least as many calibration windows (--nsamples {nsamples})")
    dev = resolve_device(device)
    fwd_dtype = resolve_dtype(dtype, dev)
    seqlen = min(seqlen, getattr(config, "max_position_embeddings", seqlen))
    log.info("loading %s", model_name)
    model, tokenizer, _ = load_model(model_name)
    log.info("calibration: %d x %d tokens of %s", nsamples, seqlen, calib)
    calib_ids = calibration_ids(tokenizer, calib, nsamples, seqlen, seed)
    # The teacher of --distill, kept in the forward dtype (distill copies it again only to move it to a GPU).
    dense = copy.deepcopy(model).to(dtype=fwd_dtype) if distill else None
    log.info("pruning %d layers on %s in %s", len(adapter.layers(model)), dev, fwd_dtype)
    report = prune(model, calib_ids, sparsity, structure=structure, restore_weights=not no_restore, damp=damp,
                   selection=selection, target=restore_target, bias=bias, guard=not no_guard, ffn_widths=ffn_widths,
                   device=dev, dtype=fwd_dtype, progress=progress)
    distilled = None
    if distill:
        log.info("distilling from the dense model on %d calibration windows", distill)
        distilled = run_distill(model, dense, calib_ids, distill, lr=distill_lr, step_tokens=distill_step_tokens,
                                device=dev, dtype=fwd_dtype, progress=progress).to_dict()
        del dense
    info = provenance(
        source_model=model_name, revision=revision(model), architecture=adapter.family,
        model_type=config.model_type, calibration={"source": calib, "nsamples": nsamples, "seqlen": seqlen,
                                                   "seed": seed},
        params=param_counts(model, adapter), distill=distilled, **report.to_dict(),
    )
    return model, tokenizer, info


def param_counts(model, adapter) -> dict:
    """Parameters actually stored, and the decoder linear weights that are stored and non-zero."""
    from torch import nn

    stored = sum(p.numel() for p in model.parameters())
    linear = [m.weight for layer in adapter.layers(model) for m in layer.modules() if isinstance(m, nn.Linear)]
    return {
        "stored": stored,
        "decoder_linear_stored": sum(w.numel() for w in linear),
        "decoder_linear_nonzero": sum(int(w.count_nonzero()) for w in linear),
    }


@main.command()
@prune_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@verbosity
def prune(out: Path, force: bool, progress: bool, **options) -> None:
    """Prune a model with FASP and save it as a loadable HF directory with fasp.json."""
    from exporters.hf import export_hf
    from faspx.outputs import atomic_dir, check_out

    check_out(out, force)
    start = time.perf_counter()
    model, tokenizer, info = run_prune(progress=progress, **options)
    with atomic_dir(out, force) as tmp:
        # The HF exporter, in the model's own dtype: stock, or nemotron-nas for per-layer widths.
        export_hf(model, tokenizer, tmp, info, dtype="auto")
    p = info["params"]
    click.echo(
        f"pruned {options['model_name']} to {out}: removed {info['removed_fraction']:.1%} of decoder linear "
        f"weights ({p['decoder_linear_nonzero']:,} non-zero of {p['decoder_linear_stored']:,} stored; "
        f"{p['stored']:,} parameters stored) in {time.perf_counter() - start:.1f}s"
    )


@main.command("eval")
@click.option("--model", "model_name", required=True, help="Hub id or local model directory.")
@click.option("--dataset", default="wikitext2", show_default=True,
              help="wikitext2 (test split), c4 (validation), or a .txt/.jsonl/.parquet file.")
@click.option("--seqlen", type=int, default=2048, show_default=True, help="Window length.")
@click.option("--max-windows", type=int, default=None, help="Evaluate only the first N windows.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Also write the result to this JSON file.")
@verbosity
def eval_cmd(model_name: str, dataset: str, seqlen: int, max_windows: int | None, device: str, dtype: str,
             json_out: Path | None, progress: bool) -> None:
    """Perplexity on non-overlapping windows (the SparseGPT/Wanda protocol); an ONNX export folder
    (model.onnx) is evaluated in onnxruntime."""
    from faspx.data import eval_ids
    from faspx.eval import perplexity
    from faspx.models import load_model
    from faspx.outputs import write_json
    from faspx.prune import resolve_device, resolve_dtype

    dev = resolve_device(device)
    if (Path(model_name).expanduser() / "model.onnx").exists():  # an ONNX export runs in onnxruntime
        from exporters.ort_runtime import OnnxDecoder

        decoder = OnnxDecoder(Path(model_name).expanduser(), device=dev.type)
        tokenizer = decoder.tokenizer

        def model(x):
            return torch.from_numpy(decoder.prefill(x.numpy())[0])
    else:
        model, tokenizer, _ = load_model(model_name, dtype=resolve_dtype(dtype, dev), per_layer_widths=True)
    ids = eval_ids(tokenizer, dataset)
    start = time.perf_counter()
    ppl = perplexity(model, ids, seqlen, max_windows=max_windows, device=dev, progress=progress)
    windows = min(ids.numel() // seqlen, max_windows or 10**9)
    result = {"model": model_name, "dataset": dataset, "seqlen": seqlen, "windows": windows,
              "perplexity": ppl, "seconds": time.perf_counter() - start}
    if json_out:
        write_json(json_out, result)
    click.echo(f"perplexity {ppl:.4f} ({dataset}, {windows} windows of {seqlen}, {model_name})")


def _size(nbytes: int) -> str:
    """Bytes for people: 812 B, 14.2 KB, 3.4 MB, 1.27 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{nbytes} B"


def _files_line(summary: dict) -> str:
    files = ", ".join(f"{name} {_size(n)}" for name, n in summary["files"].items())
    return f"{files}; total {_size(summary['bytes'])}"


@main.command("export")
@click.option("--model", "model_name", required=True,
              help="Model directory (e.g. the output of faspx prune) or hub id.")
@click.option("--target", type=click.Choice(["hf", "onnx", "all"]), default="all", show_default=True,
              help="hf: stock safetensors checkpoint in OUT/hf; onnx: validated ONNX graph in OUT/onnx; all: both.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True, help="Saved weights of the HF export (auto: the source checkpoint's dtype).")
@click.option("--fp16", is_flag=True, help="ONNX graph in float16 (weights and KV cache); default float32.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset.")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto",
              show_default=True, help="torch.onnx exporter; auto: dynamo, TorchScript if dynamo fails.")
@click.option("--atol", type=float, default=None,
              help="Bound on max |logits ONNX - PyTorch| [default: 1e-3 for fp32, 1e-1 for --fp16].")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@verbosity
def export_cmd(model_name: str, target: str, out: Path, dtype: str, fp16: bool, opset: int, exporter: str,
               atol: float | None, force: bool, progress: bool) -> None:
    """Export a (pruned) model: a stock HF checkpoint and/or an ONNX decoder with KV cache."""
    import json

    from exporters.hf import DTYPES
    from faspx.models import load_config, load_model
    from faspx.outputs import atomic_dir, check_out, provenance

    check_out(out, force)
    if atol is not None and not atol > 0:
        raise UsageError(f"--atol must be > 0 (got {atol})")
    config, _ = load_config(model_name)  # a directory without config.json is a UsageError here
    source_dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    hf_dtype = dtype if dtype != "auto" else source_dtype if source_dtype in DTYPES else "float32"
    fasp_path = Path(model_name).expanduser() / "fasp.json"
    if fasp_path.is_file():
        fasp_info = json.loads(fasp_path.read_text())
    else:
        log.info("%s has no fasp.json: recording it as an unpruned source", model_name)
        fasp_info = provenance(source_model=model_name, pruned=False)
    start = time.perf_counter()
    log.info("loading %s", model_name)
    # The ONNX graph and its validation run in float32; an HF-only export keeps the checkpoint's dtype.
    model, tokenizer, _ = load_model(model_name, dtype=torch.float32 if target != "hf" else "auto")
    with atomic_dir(out, force) as tmp:
        results = export_targets(model, tokenizer, tmp, target, fasp_info, hf_dtype=hf_dtype, fp16=fp16,
                                 opset=opset, exporter=exporter, atol=atol)
    click.echo(f"exported {model_name} to {out} in {time.perf_counter() - start:.1f}s")
    echo_exports(model, results)


def export_targets(model, tokenizer, out: Path, target: str, fasp_info: dict, *, hf_dtype: str = "float32",
                   fp16: bool = False, opset: int = 18, exporter: str = "auto", atol: float | None = None) -> dict:
    """Write OUT/hf and/or OUT/onnx (validated against ``model``); return their summaries."""
    from exporters.hf import export_hf
    from exporters.onnx import export_onnx, validate_onnx

    results: dict = {}
    if target in ("hf", "all"):
        log.info("writing the HF checkpoint")
        results["hf"] = export_hf(model, tokenizer, out / "hf", fasp_info, dtype=hf_dtype)
    if target in ("onnx", "all"):
        model = model.float()  # the graph and its validation are traced in float32 (fp16 is a cast)
        log.info("exporting the ONNX graph")
        results["onnx"] = export_onnx(model, tokenizer, out / "onnx", fasp_info, fp16=fp16, opset=opset,
                                      exporter=exporter)
        log.info("validating the ONNX graph against PyTorch")
        results["validation"] = validate_onnx(out / "onnx", model, atol=atol)
    return results


def echo_exports(model, results: dict) -> None:
    """The export part of a summary: files and sizes, and the validation diffs."""
    click.echo(f"  {sum(p.numel() for p in model.parameters()):,} parameters stored")
    if "hf" in results:
        form = "" if results["hf"].get("form") != "nemotron-nas" else ", nemotron-nas form: trust_remote_code / vLLM"
        click.echo(f"  hf/ ({results['hf']['dtype']}{form}): {_files_line(results['hf'])}")
    if "onnx" in results:
        o, v = results["onnx"], results["validation"]
        click.echo(f"  onnx/ ({o['dtype']}, {o['exporter']} exporter, opset {o['opset']}): {_files_line(o)}")
        click.echo(f"  ONNX vs PyTorch max |logits diff|: prefill {v['prefill_max_abs_diff']:.2e}, decode "
                   f"{v['decode_max_abs_diff']:.2e} (bound {v['bound']:.2g} = {v['atol']:g} x max |logit|; "
                   f"batch {v['batch']}, left padding, "
                   f"past up to {v['max_past_length']})")


def _torch_generate(model_dir: Path, prompts: list[str], max_new_tokens: int, device: str) -> list[str]:
    """Greedy generation in PyTorch for an HF directory (the ONNX path is exporters.OnnxDecoder)."""
    from faspx.models import load_model
    from faspx.prune import resolve_device

    dev = resolve_device(device)
    model, tokenizer, _ = load_model(str(model_dir))
    model.to(dev)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(dev)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:].cpu(), skip_special_tokens=True)


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="An ONNX export (OUT/onnx, run in onnxruntime) or an HF model directory (run in PyTorch).")
@click.option("--prompt", "prompts", required=True, multiple=True,
              help="Prompt text; repeat it for a batch (left-padded).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens to generate (greedy).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA when onnxruntime (or torch) has it, else the CPU.")
@verbosity
def generate(model_dir: Path, prompts: tuple[str, ...], max_new_tokens: int, device: str, progress: bool) -> None:
    """Greedy generation with an exported model; prints each prompt followed by its continuation."""
    from exporters.files import require_model_dir

    model_dir = require_model_dir(model_dir)
    if (model_dir / "model.onnx").exists():
        from exporters.ort_runtime import OnnxDecoder

        texts = OnnxDecoder(model_dir, device=device).generate_text(list(prompts), max_new_tokens)
    else:
        texts = _torch_generate(model_dir, list(prompts), max_new_tokens, device)
    for prompt, text in zip(prompts, texts, strict=True):
        click.echo(prompt + text)


@main.command()
@prune_options
@click.option("--target", type=click.Choice(["hf", "onnx", "all"]), default="all", show_default=True,
              help="What to export into OUT: hf/ (stock checkpoint), onnx/ (validated graph), or both.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--save-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Weights of the HF export.")
@click.option("--fp16", is_flag=True, help="ONNX graph in float16 (for GPUs).")
@click.option("--atol", type=float, default=None, help="Bound on the ONNX vs PyTorch logits diff.")
@click.option("--eval", "with_eval", is_flag=True, help="Add dense and pruned perplexity to the report.")
@click.option("--eval-dataset", default="wikitext2", show_default=True, help="wikitext2, c4 or a text file.")
@click.option("--eval-windows", type=int, default=None, help="Evaluate only the first N windows.")
@click.option("--bench", "with_bench", is_flag=True,
              help="Then benchmark dense vs pruned (torch and onnxruntime, batch 1) into OUT/bench.")
@verbosity
def build(target: str, out: Path, save_dtype: str, fp16: bool, atol: float | None, with_eval: bool,
          eval_dataset: str, eval_windows: int | None, with_bench: bool, force: bool, progress: bool,
          **options) -> None:
    """Prune, export and validate in one go: OUT/hf, OUT/onnx, OUT/fasp.json, OUT/build.log."""
    from faspx.outputs import atomic_dir, check_out, write_json

    check_out(out, force)
    if atol is not None and not atol > 0:
        raise UsageError(f"--atol must be > 0 (got {atol})")
    if options["ffn_widths"] == "per-layer" and (target != "hf" or with_bench):
        raise UsageError("--ffn-widths per-layer writes a nemotron-nas checkpoint, not a stock one: use --target hf "
                         "without --bench (the ONNX export and the benchmark take stock models)")
    start = time.perf_counter()
    with atomic_dir(out, force) as tmp:
        # build.log keeps every step at INFO level, whatever -q says for the terminal.
        handler = logging.FileHandler(tmp / "build.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(min(log.getEffectiveLevel(), logging.INFO))
        try:
            log.info("faspx build %s", " ".join(sys.argv[1:]))
            model, tokenizer, info = run_prune(progress=progress, **options)
            info["timings"] = {"prune_s": info["seconds"]}
            if info["distill"]:
                info["timings"]["distill_s"] = info["distill"]["seconds"]
            t = time.perf_counter()
            info["exports"] = export_targets(model, tokenizer, tmp, target, info, hf_dtype=save_dtype, fp16=fp16,
                                             atol=atol)
            info["timings"]["export_s"] = time.perf_counter() - t
            if with_eval:
                info["eval"] = evaluate_both(options["model_name"], model, eval_dataset, eval_windows,
                                             options["device"], progress)
            write_json(tmp / "fasp.json", info)
            log.info("done in %.1fs", time.perf_counter() - start)
        finally:
            log.removeHandler(handler)
            handler.close()
    p = info["params"]
    click.echo(f"built {out} from {options['model_name']} in {time.perf_counter() - start:.1f}s")
    ffn = (f"ffn {info['n_remove']['ffn']} channels per layer" if not info["layer_widths"] else
           f"ffn widths {min(info['layer_widths'])}-{max(info['layer_widths'])} by layer, nemotron-nas form")
    click.echo(f"  removed {info['removed_fraction']:.1%} of decoder linear weights (--structure "
               f"{info['structure']}: attn {info['n_remove']['attn']}, {ffn}); non-zero "
               f"{p['decoder_linear_nonzero']:,} of {p['decoder_linear_stored']:,} stored")
    echo_exports(model, info["exports"])
    if with_eval:
        e = info["eval"]
        click.echo(f"  perplexity ({eval_dataset}, {e['windows']} windows): dense {e['dense']:.3f}, "
                   f"pruned {e['pruned']:.3f}")
    if with_bench:
        from benchmarks.report import write_report
        from benchmarks.run import run_bench
        from faspx.models import local_dir

        backends = ("torch", "onnxruntime") if target != "hf" else ("torch",)
        positions = getattr(model.config, "max_position_embeddings", 4096)
        report = run_bench(local_dir(options["model_name"]), out, backends=backends, device=options["device"],
                           batches=(1,), prompt_len=min(128, positions // 2), new_tokens=min(64, positions // 4),
                           repeats=3, progress=progress)
        with atomic_dir(out / "bench") as tmp:
            write_report(report, tmp)
        echo_bench(report, out / "bench")


def evaluate_both(dense_name: str, pruned, dataset: str, windows: int | None, device: str, progress: bool) -> dict:
    """Perplexity of the dense source and of the pruned model, same windows, same settings."""
    from faspx.data import eval_ids
    from faspx.eval import perplexity
    from faspx.models import load_model
    from faspx.prune import resolve_device

    dev = resolve_device(device)
    dense, tokenizer, _ = load_model(dense_name, dtype=torch.float32)
    ids = eval_ids(tokenizer, dataset)
    seqlen = min(2048, getattr(dense.config, "max_position_embeddings", 2048))
    log.info("perplexity of the dense model")
    dense_ppl = perplexity(dense, ids, seqlen, max_windows=windows, device=dev, progress=progress)
    del dense
    log.info("perplexity of the pruned model")
    pruned_ppl = perplexity(pruned.float(), ids, seqlen, max_windows=windows, device=dev, progress=progress)
    pruned.to("cpu")
    return {"dataset": dataset, "seqlen": seqlen, "windows": min(ids.numel() // seqlen, windows or 10**9),
            "dense": dense_ppl, "pruned": pruned_ppl}


def _csv(kind):
    def parse(_ctx, _param, value: str):
        try:
            return tuple(kind(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list") from None
    return parse


@main.command()
@click.option("--dense", required=True, help="The dense model directory (HF).")
@click.option("--pruned", required=True, help="A faspx build output (hf/, onnx/) or a pruned model directory.")
@click.option("--backend", "backends", default="torch,onnxruntime", show_default=True, callback=_csv(str),
              help="Comma-separated: torch, onnxruntime, vllm (an unavailable one is reported as skipped).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch", "batches", default="1,8", show_default=True, callback=_csv(int), help="Batch sizes.")
@click.option("--prompt-len", type=int, default=128, show_default=True, help="Prompt tokens.")
@click.option("--new-tokens", type=int, default=128, show_default=True, help="Generated tokens (greedy).")
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed runs per variant (interleaved).")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed runs per variant first.")
@click.option("--eval", "with_eval", is_flag=True, help="Add dense and pruned perplexity to the report.")
@click.option("--eval-dataset", "eval_datasets", default="wikitext2", show_default=True, callback=_csv(str),
              help="wikitext2, c4 or text/parquet files, comma-separated.")
@click.option("--eval-windows", type=int, default=None, help="Evaluate only the first N windows.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench"), show_default=True,
              help="Report directory: report.json, report.md, report.png.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@verbosity
def bench(dense: str, pruned: str, backends: tuple[str, ...], device: str, batches: tuple[int, ...], prompt_len: int,
          new_tokens: int, repeats: int, warmup: int, with_eval: bool, eval_datasets: tuple[str, ...],
          eval_windows: int | None, out: Path, force: bool, progress: bool) -> None:
    """Tokens/s, latency and memory of dense vs pruned, interleaved, as JSON, Markdown and a plot."""
    from benchmarks.run import run_bench

    report = run_bench(dense, pruned, backends=backends, device=device, batches=batches, prompt_len=prompt_len,
                       new_tokens=new_tokens, repeats=repeats, warmup=warmup, eval=with_eval,
                       eval_datasets=eval_datasets, max_windows=eval_windows, progress=progress, out=out, force=force)
    echo_bench(report, out)


def echo_bench(report: dict, out: Path) -> None:
    """The benchmark's key ratios and where its report is."""
    for entry in report["results"]:
        r = entry["ratios"]
        click.echo(f"  {entry['backend']} batch {entry['batch']}: pruned/dense decode tokens/s "
                   f"{r['decode_tokens_per_s']:.3f}x, prefill {r['prefill_tokens_per_s']:.3f}x, "
                   f"end-to-end {r['end_to_end_tokens_per_s']:.3f}x")
    click.echo(f"  ideal batch-1 decode speedup (weights read per token): "
               f"{report['roofline']['ideal_decode_speedup']:.3f}x")
    for row in report.get("perplexity") or []:
        click.echo(f"  perplexity ({row['dataset']}, {row['windows']} windows): dense {row['dense']:.3f}, "
                   f"pruned {row['pruned']:.3f}")
    for skipped in report["skipped"]:
        click.echo(f"  skipped {skipped['backend']}: {skipped['reason']}")
    click.echo(f"report: {out / 'report.md'}  plot: {out / 'report.png'}")


if __name__ == "__main__":
    main()
