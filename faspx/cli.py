"""The ``faspx`` command line: prune, eval (and the later stages' commands)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import click
import torch

from faspx.errors import FaspxError, UsageError

log = logging.getLogger("faspx")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so that every cleanup runs."""


def _on_signal(signum, _frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def interruptible():
    """SIGTERM and SIGHUP (``timeout``, ``kill``, SLURM, Kubernetes, a closed terminal) unwind the
    command as Ctrl-C does: temporary outputs are removed, nothing half-written is left as OUT."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interrupted_line(err: KeyboardInterrupt, written: list) -> str:
    """What an interruption leaves: nothing, or the outputs that were complete before it."""
    why = f"interrupted ({err.args[0]})" if isinstance(err, Interrupted) and err.args else "interrupted"
    if not written:
        return f"{why}; nothing was written"
    done = ", ".join(str(p) for p in written)
    return f"{why}; complete before the interruption: {done}; nothing after it was written"


def verbosity(fn):
    """-q/-v on every command; errors become one line and an exit code unless -v."""

    @click.option("-q", "--quiet", is_flag=True, help="No progress bars or log lines.")
    @click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
    @functools.wraps(fn)
    def wrapper(*args, quiet: bool, verbose: bool, **kwargs):
        from tqdm.contrib.logging import logging_redirect_tqdm

        from faspx import outputs

        level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
        logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
        for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # lm-eval logs every step and warns about faspx's own task configs: faspx prints the summary
        logging.getLogger("lm_eval").setLevel(logging.DEBUG if verbose else logging.ERROR)
        if quiet:
            import transformers

            transformers.utils.logging.disable_progress_bar()
            transformers.utils.logging.set_verbosity_error()
        written_before = len(outputs.WRITTEN)
        hint = "" if verbose else " (run with -v for the traceback)"
        try:
            # log lines go through tqdm's writer, above the progress bars instead of into them
            with interruptible(), logging_redirect_tqdm():
                for handler in logging.getLogger().handlers:  # tqdm's replacement handler has no level
                    handler.setLevel(level)
                return fn(*args, progress=not quiet, **kwargs)
        except click.exceptions.Exit:
            raise
        except FaspxError as err:  # UsageError included: exit 2
            _fail(err, verbose, err.exit_code)
        except torch.OutOfMemoryError as err:
            _fail(FaspxError("out of memory: lower --nsamples/--seqlen, use --dtype bfloat16, or "
                             "--device cpu"), verbose, 1, cause=err)
        except KeyboardInterrupt as err:
            _fail(FaspxError(interrupted_line(err, outputs.WRITTEN[written_before:])), verbose, 1, cause=err)
        except Exception as err:  # noqa: BLE001 - anything unforeseen still gets one line
            _fail(FaspxError(f"{type(err).__name__}: {err}{hint}"), verbose, 1, cause=err)

    return wrapper


def _fail(err: Exception, verbose: bool, code: int, cause: BaseException | None = None) -> None:
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
    """The pruning options shared by ``prune`` and ``build``: the recipe, overrides of its fields, calibration."""
    from faspx.recipes import DEFAULT, PRESETS

    options = [
        click.option("--model", "model_name", required=True, help="Hub id or local model directory."),
        click.option("--sparsity", type=float, required=True,
                     help="Fraction of the decoder's linear weights to remove."),
        click.option("--recipe", "recipe_spec", default=DEFAULT, show_default=True,
                     help=f"How to prune: a preset ({', '.join(PRESETS)}; see `faspx recipes`), a .yaml/.json "
                          f"recipe file, or a faspx output's fasp.json to repeat its run. The default, {DEFAULT}, is "
                          "the best stock model faspx makes; --recipe paper is FASP as published."),
        click.option("--calib", default="wikitext2", show_default=True,
                     help="Calibration text: wikitext2, c4, or a .txt/.jsonl/.parquet file."),
        click.option("--nsamples", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Calibration windows."),
        click.option("--seqlen", type=click.IntRange(min=2), default=2048, show_default=True,
                     help="Tokens per window (capped at the model's max positions)."),
        click.option("--structure", type=click.Choice(["fasp", "mlp", "auto", "2ssp"]), default=None,
                     help="Override: fasp (FFN + V/O pairs at one ratio), mlp (the whole budget in the FFN), "
                          "auto (the split that moves the last layer's output least, measured), 2ssp (whole "
                          "attention submodules + FFN width, 2SSP's balance; nemotron-nas form)."),
        click.option("--selection", type=click.Choice(["wanda", "obs", "norm"]), default=None,
                     help="Override: wanda (the paper's score), obs (restoration-aware, structured OBS) or norm "
                          "(2SSP's mean activation norm)."),
        click.option("--restore/--no-restore", default=None,
                     help="Override: least-squares restoration on or off (off: structured Wanda)."),
        click.option("--damp", default=None,
                     help="Override: restoration damping relative to mean(diag G[M,M]), or 'auto' (per matrix, "
                          "on held-out calibration samples)."),
        click.option("--guard/--no-guard", default=None,
                     help="Override: refuse a restoration that raises a layer's error (off: the paper as written)."),
        click.option("--ffn-widths", type=click.Choice(["uniform", "per-layer"]), default=None,
                     help="Override: per-layer (LLaMA) shares the FFN budget between layers, widths in steps of 256, "
                          "written in the nemotron-nas form vLLM serves: NOT stock (no --bench)."),
        click.option("--distill", type=click.IntRange(min=0), default=None,
                     help="Override: distil from the dense model on the first N calibration windows (0: none; "
                          "needs the whole model twice on the device)."),
        click.option("--distill-lr", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Override: peak learning rate of the distillation (decays linearly to 0)."),
        click.option("--distill-step-tokens", type=click.IntRange(min=1), default=None,
                     help="Override: tokens per distillation step (each window is cut into pieces this long)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--dtype", default="auto", show_default=True,
                     help="Forward dtype while pruning: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration sample."),
        click.option("--force", is_flag=True, help="Replace --out if it exists."),
        click.option("--resume", is_flag=True,
                     help="Keep a checkpoint after every pruned layer (beside OUT) and continue from it when the "
                          "same command is run again after an interruption; the output is the same bytes."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


RECIPE_FLAGS = ("structure", "selection", "restore", "damp", "guard", "ffn_widths", "distill", "distill_lr",
                "distill_step_tokens")


def split_prune_options(options: dict):
    """(model name, sparsity, Recipe, Calibration, device, dtype) from ``prune_options``' values."""
    from faspx.pipeline import Calibration
    from faspx.recipes import get_recipe

    overrides = {name: options.pop(name) for name in RECIPE_FLAGS}
    recipe = get_recipe(options.pop("recipe_spec"), **overrides)
    calib = Calibration(options.pop("calib"), options.pop("nsamples"), options.pop("seqlen"), options.pop("seed"))
    model_name, sparsity = options.pop("model_name"), options.pop("sparsity")
    return model_name, sparsity, recipe, calib, options.pop("device"), options.pop("dtype")


def command_line(ctx: click.Context) -> str:
    """The command as parsed, every option spelled out (defaults too): what build.log opens with, so that
    the line reruns the same build whatever shell, wrapper or defaults the next faspx has."""
    import shlex

    words = ["faspx", ctx.command.name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param, click.Option) or value is None or param.name in ("quiet", "verbose"):
            continue
        if param.is_flag:
            if param.secondary_opts and not value:
                words.append(param.secondary_opts[0])
            elif value:
                words.append(param.opts[0])
            continue
        values = value if isinstance(value, tuple) else (value,)
        words.extend([param.opts[0], ",".join(str(v) for v in values)])
    return shlex.join(words)


def removed_line(info) -> str:
    """What the prune removed, for the summary."""
    p, r = info.params, info.prune
    widths = r.get("layer_widths")
    ffn = (f"ffn widths {min(widths)}-{max(widths)} by layer" if widths and len(set(widths)) > 1
           else f"ffn {r['n_remove']['ffn']} channels per layer")
    if r.get("attention_removed"):
        ffn += f", attention of layers {sorted(r['attention_removed'])} removed"
    if info.form == "nemotron-nas":
        ffn += ", nemotron-nas form"
    return (f"removed {r['removed_fraction']:.1%} of decoder linear weights (recipe {info.recipe['name']}, "
            f"structure {info.recipe['structure']}: attn {r['n_remove']['attn']}, {ffn}); non-zero "
            f"{p['decoder_linear_nonzero']:,} of {p['decoder_linear_stored']:,} stored, {p['stored']:,} parameters")


@main.command()
@prune_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@verbosity
def prune(out: Path, force: bool, resume: bool, progress: bool, **options) -> None:
    """Prune a model and save it as a loadable HF directory with fasp.json."""
    from faspx.outputs import check_out
    from faspx.pipeline import prune_model, save_pruned

    check_out(out, force)
    model_name, sparsity, recipe, calib, device, dtype = split_prune_options(options)
    start = time.perf_counter()
    result = prune_model(model_name, sparsity, recipe, calib=calib, device=device, dtype=dtype, progress=progress,
                         out=out, resume=resume)
    save_pruned(result, out, force)
    click.echo(f"pruned {model_name} to {out} in {time.perf_counter() - start:.1f}s")
    click.echo(f"  {removed_line(result.info)}")


@main.command()
def recipes() -> None:
    """The recipe presets: name, stock or not, what each does, and what it measured on SmolLM2-135M."""
    from faspx.recipes import DEFAULT, table

    rows = table()
    levels = ("0.2", "0.25", "0.3", "0.375")
    click.echo(f"{'recipe':<13} {'stock':<6} " + " ".join(f"{'ppl@' + s:>9}" for s in levels) + f" {'time':>6}  "
               "what it does")
    for row in rows:
        ppl = " ".join(f"{row['ppl_' + s]:>9.2f}" if "ppl_" + s in row else f"{'-':>9}" for s in levels)
        time_x = f"{row['time_x']:.2f}x" if "time_x" in row else "-"
        name = row["name"] + ("*" if row["name"] == DEFAULT else "")
        click.echo(f"{name:<13} {'yes' if row['stock'] else 'no':<6} {ppl} {time_x:>6}  {row['what']}")
    click.echo("* the default. ppl: WikiText-2 (148 windows of 2048, bf16) of SmolLM2-135M pruned with 128 x 2048 C4 "
               "tokens (2ssp recipes: the fraction of decoder-layer parameters, norms included); time: prune + "
               "distillation in units of one dense forward over those tokens, at the lowest rate measured "
               "(docs/accuracy.md).")


def _tasks(_ctx, _param, value: str | None) -> tuple[str, ...] | None:
    from faspx.tasks import parse_tasks

    try:
        return parse_tasks(value) if value is not None else None
    except UsageError as err:
        raise click.BadParameter(str(err).removeprefix("--tasks: ")) from None


def _zeroshot(model_name: str, tasks: tuple[str, ...], tasks_dir: str | None, limit: int | None, batch_size: int,
              device: str, dtype: str, json_out: Path | None, progress: bool) -> None:
    """faspx eval --tasks: every check that needs no weights, then lm-eval, then the scores."""
    from faspx.models import check_config_file, check_weight_files, resolve
    from faspx.outputs import check_file_out, write_json
    from faspx.prune import resolve_device, resolve_dtype
    from faspx.tasks import check_tasks_dir
    from faspx.zeroshot import require_lm_eval, score_model

    root = check_tasks_dir(tasks, tasks_dir)
    require_lm_eval()
    if json_out:
        check_file_out(json_out)
    resolve_dtype(dtype, resolve_device(device))
    source, _ = resolve(model_name)
    if Path(source).is_dir():
        check_config_file(Path(source) / "config.json")
        check_weight_files(source)
    result = score_model(model_name, tasks, root, limit, batch_size, device, dtype, progress=progress)
    rows = f"first {limit} rows" if limit else "all rows"
    click.echo(f"zero-shot accuracy of {model_name} ({result['runtime']}, {result['dtype']}; {rows}; "
               f"lm-eval {result['lm_eval']}, {result['seconds']:.1f}s)")
    for task, entry in result["tasks"].items():
        scores = ", ".join(f"{m} {v['value']:.4f}" for m, v in entry["metrics"].items())
        note = f"  [{entry['differs_from_lm_eval']}]" if "differs_from_lm_eval" in entry else ""
        click.echo(f"  {task:<14} {scores} ({entry['rows']} rows){note}")
    click.echo(f"  {'mean':<14} {result['mean']:.4f} (acc_norm where a task has it, else acc)")
    if json_out:
        write_json(json_out, result)


@main.command("eval")
@click.option("--model", "model_name", required=True, help="Hub id or local model directory.")
@click.option("--dataset", default="wikitext2", show_default=True,
              help="wikitext2 (test split), c4 (validation), or a .txt/.jsonl/.parquet file.")
@click.option("--seqlen", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Window length (capped at the model's max positions).")
@click.option("--max-windows", type=click.IntRange(min=1), default=None, help="Evaluate only the first N windows.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Also write the result to this JSON file (replaced if it exists).")
@click.option("--tasks", default=None, callback=_tasks,
              help="Zero-shot accuracy instead of perplexity, through lm-evaluation-harness: comma-separated "
                   "boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, or all.")
@click.option("--tasks-dir", default=None,
              help="Directory of the task files [default: $FASPX_ZEROSHOT_DIR or ../shared/data/zeroshot]; "
                   "hub: lm-eval's own tasks, data from the Hugging Face hub.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N rows of each task.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Log-likelihood requests per forward (zero-shot).")
@verbosity
def eval_cmd(model_name: str, dataset: str, seqlen: int, max_windows: int | None, device: str, dtype: str,
             json_out: Path | None, tasks: tuple[str, ...] | None, tasks_dir: str | None, limit: int | None,
             batch_size: int, progress: bool) -> None:
    """Perplexity on non-overlapping windows (the SparseGPT/Wanda protocol), or with --tasks zero-shot
    accuracy (lm-evaluation-harness); an ONNX export folder (model.onnx) is evaluated in onnxruntime."""
    from faspx.data import eval_ids
    from faspx.eval import perplexity
    from faspx.models import check_config_file, check_weight_files, load_tokenizer, resolve
    from faspx.outputs import check_file_out, write_json
    from faspx.pipeline import check_eval, eval_seqlen, load_any
    from faspx.prune import resolve_device, resolve_dtype

    if tasks:
        return _zeroshot(model_name, tasks, tasks_dir, limit, batch_size, device, dtype, json_out, progress)
    # Everything that needs no weights first: the text, the windows, the output file, the device.
    check_eval(dataset, max_windows, seqlen)
    if json_out:
        check_file_out(json_out)
    dev = resolve_device(device)
    eval_dtype = resolve_dtype(dtype, dev)
    source, _ = resolve(model_name)
    onnx = (Path(source) / "model.onnx").exists()
    if Path(source).is_dir():
        check_config_file(Path(source) / "config.json")
        check_weight_files(source)
        # read as JSON: a nemotron-nas config loads only with its code files
        seqlen = eval_seqlen(json.loads((Path(source) / "config.json").read_text()).get("max_position_embeddings"),
                             seqlen)
    ids = eval_ids(load_tokenizer(model_name), dataset)
    if ids.numel() < seqlen:
        raise UsageError(f"{dataset} has {ids.numel()} tokens, fewer than one window of {seqlen}: give more "
                         "text or a lower --seqlen")
    if onnx:  # an ONNX export runs in onnxruntime
        from faspx.exporters.ort_runtime import OnnxDecoder

        decoder = OnnxDecoder(Path(source), device=str(dev))

        def model(x):
            return torch.from_numpy(decoder.prefill(x.numpy())[0])
    else:
        model, _ = load_any(model_name, dtype=eval_dtype)
    start = time.perf_counter()
    ppl = perplexity(model, ids, seqlen, max_windows=max_windows, device=dev, progress=progress)
    windows = min(ids.numel() // seqlen, max_windows or 10**9)
    result = {"model": model_name, "dataset": dataset, "seqlen": seqlen, "windows": windows,
              "perplexity": ppl, "seconds": time.perf_counter() - start}
    click.echo(f"perplexity {ppl:.4f} ({dataset}, {windows} windows of {seqlen}, {model_name})")
    if json_out:
        write_json(json_out, result)


def _size(nbytes: int) -> str:
    """Bytes for people: 812 B, 14.2 KB, 3.4 MB, 1.27 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{nbytes} B"


def _files_line(summary: dict) -> str:
    files = ", ".join(f"{name} {_size(n)}" for name, n in summary["files"].items())
    return f"{files}; total {_size(summary['bytes'])}"


EXPORTER_HELP = ("auto: onnxruntime-genai's model builder where it can write the model (LLaMA, Mistral, Qwen2 stock "
                 "outputs, float32, opset 18; seconds instead of minutes; fused attention, checked against PyTorch at "
                 "batch 1), else torch.onnx's dynamo exporter, TorchScript if that fails; the summary says which ran.")


def _csv(kind):
    def parse(_ctx, _param, value: str):
        try:
            return tuple(kind(v.strip()) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list") from None
    return parse


def quantize_options(command):
    """--quantize and its settings, shared by export and build."""
    for option in reversed([
        click.option("--quantize", "quantize", default="", callback=_csv(str),
                     help="int4, int8 or int8,int4: also write OUT/onnx-int4 and/or OUT/onnx-int8, weight-only "
                          "MatMulNBits (onnxruntime's quantizer; int4 quantizes the embedding table too), each "
                          "checked against OUT/onnx by perplexity and greedy agreement."),
        click.option("--block-size", type=int, default=32, show_default=True,
                     help="Quantization block (input channels per scale): a power of two, 16..256."),
        click.option("--accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True,
                     help="MatMulNBits compute type on the CPU: 4 = int8 activations (fast), 0 = as the inputs."),
        click.option("--int4-layout", type=click.Choice(["mixed", "half", "uniform"]), default="mixed",
                     show_default=True,
                     help="Which linears of the int4 graph keep 8 bits: mixed = the LM head, attention's q/k/v and "
                          "the FFN output projection; half = the head, and those in half the layers (llama.cpp's "
                          "Q4_K_M choice); uniform = none."),
        click.option("--quantize-eval", default="wikitext2", show_default=True,
                     help="Text of the quantized graph's check (wikitext2, c4 or a file): 8 windows."),
    ]):
        command = option(command)
    return command


def quantization_of(quantize: tuple[str, ...], block_size: int, accuracy_level: int, int4_layout: str,
                    quantize_eval: str):
    """The pipeline's Quantization from the options."""
    from faspx.pipeline import Quantization

    return Quantization(tuple(quantize), block_size, accuracy_level, quantize_eval, layout=int4_layout)


@main.command("export")
@click.option("--model", "model_name", required=True,
              help="Model directory (e.g. the output of faspx prune) or hub id.")
@click.option("--target", type=click.Choice(["hf", "onnx", "all"]), default="all", show_default=True,
              help="hf: stock safetensors checkpoint in OUT/hf; onnx: validated ONNX graph in OUT/onnx; all: both.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True, help="Saved weights of the HF export (auto: the source checkpoint's dtype).")
@click.option("--fp16", is_flag=True, help="ONNX graph in float16 (weights and KV cache); default float32.")
@click.option("--opset", type=int, default=18, show_default=True,
              help="ONNX opset (14 or newer; below 18 the TorchScript exporter writes it). The summary and "
                   "fasp.json give the opset the file declares.")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript", "builder"]), default="auto",
              show_default=True, help=EXPORTER_HELP)
@click.option("--atol", type=float, default=None,
              help="Validation bound, relative: max |logits ONNX - PyTorch| must stay below atol x max |logit| "
                   "[default: 1e-3 for fp32, 1e-1 for --fp16].")
@quantize_options
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@verbosity
def export_cmd(model_name: str, target: str, out: Path, dtype: str, fp16: bool, opset: int, exporter: str,
               atol: float | None, quantize: tuple[str, ...], block_size: int, accuracy_level: int, int4_layout: str,
               quantize_eval: str, force: bool, progress: bool) -> None:
    """Export a (pruned) model: a stock HF checkpoint and/or an ONNX decoder with KV cache."""
    from faspx.pipeline import export

    start = time.perf_counter()
    quantization = quantization_of(quantize, block_size, accuracy_level, int4_layout, quantize_eval)
    model, _, results = export(model_name, out, target, dtype=dtype, fp16=fp16, opset=opset, exporter=exporter,
                               atol=atol, quantization=quantization, force=force, progress=progress)
    click.echo(f"exported {model_name} to {out} in {time.perf_counter() - start:.1f}s")
    click.echo(f"  {sum(p.numel() for p in model.parameters()):,} parameters stored")
    echo_exports(results)


def echo_exports(results: dict) -> None:
    """The export part of a summary: files and sizes, and the validation diffs."""
    if "hf" in results:
        form = "" if results["hf"].get("form") != "nemotron-nas" else ", nemotron-nas form: trust_remote_code / vLLM"
        click.echo(f"  hf/ ({results['hf']['dtype']}{form}): {_files_line(results['hf'])}")
    if "onnx" in results:
        o, v = results["onnx"], results["validation"]
        click.echo(f"  onnx/ ({o['dtype']}, {o['exporter']} exporter, opset {o['opset']}): {_files_line(o)}")
        if o.get("onnxruntime_genai"):
            click.echo(f"  onnxruntime-genai: {o['onnxruntime_genai']}")
        click.echo(f"  ONNX vs PyTorch max |logits diff|: prefill {v['prefill_max_abs_diff']:.2e}, decode "
                   f"{v['decode_max_abs_diff']:.2e} (bound {v['bound']:.2g} = {v['atol']:g} x max |logit|; "
                   f"batch {v['batch']}, {'left padding' if v['batch'] > 1 else 'no padding'}, "
                   f"past up to {v['max_past_length']})")
    for done in (results.get("quantized") or {}).values():
        q, c = done["summary"], done["check"]
        mix = f", {q['eight_bit_matmuls']} of them 8-bit ({q['layout']})" if q.get("eight_bit_matmuls") else ""
        click.echo(f"  onnx-{q['precision']}/ (MatMulNBits {q['bits']}-bit{mix}, block {q['block_size']}, embeddings "
                   f"{q['embeddings']}): {_size(q['bytes'])}, {q['bytes'] / q['source_bytes']:.3f}x onnx/")
        g, ppl = c["greedy"], c[f"ppl_{q['precision']}"]
        click.echo(f"  {q['precision']} vs float32 graph: perplexity {ppl:.3f} vs {c['ppl_float32']:.3f} "
                   f"({c['ppl_ratio']:.3f}x, bound {c['bound']:g}x; {c['dataset']}, {c['windows']} windows of "
                   f"{c['seqlen']}); greedy tokens equal {g['tokens_equal']:.1%}, before the first difference "
                   f"{g['prefix_equal']:.1%} ({g['prompts']} prompts x {g['new_tokens']})")


GENERATE_RUNTIMES = ("auto", "torch", "onnxruntime", "genai")


def check_runtime(runtime: str, model_dir: Path, device: str) -> str:
    """The runtime ``faspx generate`` uses for ``model_dir``, or a UsageError naming what does not fit."""
    is_onnx = (model_dir / "model.onnx").exists()
    if runtime == "auto":
        runtime = "onnxruntime" if is_onnx else "torch"
    if runtime != "torch" and not is_onnx:
        raise UsageError(f"--runtime {runtime} runs an ONNX export (OUT/onnx); {model_dir} has no model.onnx: "
                         "give the export's onnx/ directory, or --runtime torch")
    if runtime == "torch" and is_onnx:
        raise UsageError(f"{model_dir} is an ONNX export: --runtime torch runs an HF directory (OUT/hf)")
    if runtime == "genai":
        from faspx.exporters.genai import GENAI_CONFIG

        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:
            raise UsageError("--runtime genai needs onnxruntime-genai: pip install 'faspx[genai]'") from None
        if device not in ("auto", "cpu"):
            raise UsageError(f"--runtime genai runs on the CPU here (the export's genai_config.json names no "
                             f"execution provider): use --device cpu or auto, not {device}")
        if not (model_dir / GENAI_CONFIG).exists():
            raise UsageError(f"{model_dir} has no {GENAI_CONFIG}: onnxruntime-genai cannot run it (an OPT export "
                             "has none: onnxruntime-genai has no OPT model type); use --runtime onnxruntime")
    if runtime == "torch" and device != "auto":
        from faspx.prune import resolve_device

        resolve_device(device)  # checked before the model is loaded
    return runtime


def _torch_generate(model_dir: Path, prompts: list[str], max_new_tokens: int, device: str) -> list[str]:
    """Greedy generation in PyTorch for an HF directory (the ONNX path is exporters.OnnxDecoder)."""
    from faspx.exporters.ort_runtime import check_prompt_tokens
    from faspx.pipeline import load_any
    from faspx.prune import resolve_device

    dev = resolve_device(device)
    model, tokenizer = load_any(str(model_dir))
    model.to(dev)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(dev)
    check_prompt_tokens(prompts, enc["input_ids"].shape[1])
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
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N (auto: CUDA when onnxruntime, or torch, has it, else the CPU).")
@click.option("--runtime", type=click.Choice(GENERATE_RUNTIMES), default="auto", show_default=True,
              help="auto: onnxruntime for an ONNX export, PyTorch for an HF directory; genai: onnxruntime-genai's "
                   "own loop on an ONNX export (CPU; pip install faspx[genai]).")
@verbosity
def generate(model_dir: Path, prompts: tuple[str, ...], max_new_tokens: int, device: str, runtime: str,
             progress: bool) -> None:
    """Greedy generation with an exported model; prints each prompt followed by its continuation."""
    from faspx.exporters.files import require_model_dir

    empty = [i + 1 for i, p in enumerate(prompts) if not p]
    if empty:
        raise UsageError(f"--prompt number {', '.join(map(str, empty))} is empty: give some prompt text")
    model_dir = require_model_dir(model_dir)
    runtime = check_runtime(runtime, model_dir, device)
    if runtime == "torch":
        texts = _torch_generate(model_dir, list(prompts), max_new_tokens, device)
    elif runtime == "genai":
        from faspx.exporters.genai import genai_generate_text

        texts = genai_generate_text(model_dir, list(prompts), max_new_tokens)
    else:
        from faspx.exporters.ort_runtime import OnnxDecoder

        texts = OnnxDecoder(model_dir, device=device).generate_text(list(prompts), max_new_tokens)
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
@click.option("--atol", type=float, default=None,
              help="Validation bound, relative: max |logits ONNX - PyTorch| must stay below atol x max |logit| "
                   "[default: 1e-3, 1e-1 with --fp16].")
@click.option("--eval", "with_eval", is_flag=True, help="Add dense and pruned perplexity to the report.")
@click.option("--eval-dataset", default="wikitext2", show_default=True, help="wikitext2, c4 or a text file.")
@click.option("--eval-windows", type=click.IntRange(min=1), default=None, help="Evaluate only the first N windows.")
@click.option("--eval-tasks", default=None, callback=_tasks,
              help="Add dense and pruned zero-shot accuracy (lm-evaluation-harness) on these tasks (comma-separated, "
                   "or all) to fasp.json and OUT/zeroshot.md; the dense scores are cached.")
@click.option("--eval-limit", type=click.IntRange(min=1), default=None,
              help="Score only the first N rows of each task.")
@click.option("--tasks-dir", default=None, help="Directory of the task files (see faspx eval --tasks-dir).")
@click.option("--bench", "with_bench", is_flag=True,
              help="Then benchmark dense vs pruned (torch and onnxruntime, batch 1) into OUT/bench.")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript", "builder"]), default="auto",
              show_default=True, help=EXPORTER_HELP)
@quantize_options
@verbosity
def build(target: str, out: Path, save_dtype: str, fp16: bool, atol: float | None, with_eval: bool,
          eval_dataset: str, eval_windows: int | None, eval_tasks: tuple[str, ...] | None, eval_limit: int | None,
          tasks_dir: str | None, with_bench: bool, exporter: str, quantize: tuple[str, ...], block_size: int,
          accuracy_level: int, int4_layout: str, quantize_eval: str, force: bool, resume: bool, progress: bool,
          **options) -> None:
    """Prune, export and validate in one go: OUT/hf, OUT/onnx, OUT/fasp.json, OUT/build.log.

    The default recipe, quality, gives the best stock model faspx makes (`faspx recipes`)."""
    from faspx.pipeline import build as run_build

    model_name, sparsity, recipe, calib, device, dtype = split_prune_options(options)
    start = time.perf_counter()
    built = run_build(model_name, sparsity, out, recipe, calib=calib, target=target, device=device, dtype=dtype,
                      save_dtype=save_dtype, fp16=fp16, atol=atol, eval_dataset=eval_dataset if with_eval else None,
                      eval_windows=eval_windows, eval_tasks=eval_tasks or (), eval_limit=eval_limit,
                      tasks_dir=tasks_dir, bench=with_bench,
                      quantization=quantization_of(quantize, block_size, accuracy_level, int4_layout, quantize_eval),
                      exporter=exporter, force=force, progress=progress,
                      command=command_line(click.get_current_context()), resume=resume)
    info = built.info
    click.echo(f"built {out} from {model_name} in {time.perf_counter() - start:.1f}s")
    click.echo(f"  {removed_line(info)}")
    click.echo(f"  {built.params_stored:,} parameters stored")
    echo_exports(info.exports)
    if info.eval:
        e = info.eval
        click.echo(f"  perplexity ({eval_dataset}, {e['windows']} windows): dense {e['dense']:.3f}, "
                   f"pruned {e['pruned']:.3f}")
    if info.zeroshot:
        z = info.zeroshot
        rows = f"first {z['limit']} rows" if z["limit"] else "all rows"
        click.echo(f"  zero-shot ({rows}; dense {'from the cache' if z['dense'].get('cached') else 'scored'}):")
        for row in z["table"]:
            dense = "-" if row["dense"] is None else f"{row['dense']:.4f}"
            click.echo(f"    {row['task']:<14} {row['metric']:<8} dense {dense}, pruned {row['pruned']:.4f}")
        click.echo(f"  table: {out / 'zeroshot.md'}")
    if built.bench:
        echo_bench(built.bench, out / "bench")


@main.command()
@click.option("--dense", required=True, help="The dense model directory (HF).")
@click.option("--pruned", required=True, help="A faspx build output (hf/, onnx/) or a pruned model directory.")
@click.option("--backend", "backends", default="torch,onnxruntime", show_default=True, callback=_csv(str),
              help="Comma-separated: torch, onnxruntime, genai (onnxruntime-genai), vllm (its own environment: "
                   "make vllm); an unavailable one is reported as skipped.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch", "batches", default="1,8", show_default=True, callback=_csv(int), help="Batch sizes.")
@click.option("--prompt-len", "prompt_lens", default="128", show_default=True, callback=_csv(int),
              help="Prompt tokens, comma-separated: e.g. 128,2048 adds a long context, where the KV cache (which "
                   "attention removal shrinks) weighs.")
@click.option("--new-tokens", type=int, default=128, show_default=True, help="Generated tokens (greedy).")
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed runs per variant (interleaved).")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed runs per variant first.")
@click.option("--precisions", default=None, callback=lambda c, p, v: None if v is None else _csv(str)(c, p, v),
              help="Quantized exports of --pruned to add in the ONNX backends (int8, int4; comma-separated) "
                   "[default: every OUT/onnx-int* the build has]; each is compared with the dense float32 graph.")
@click.option("--eval", "with_eval", is_flag=True, help="Add dense and pruned perplexity to the report.")
@click.option("--eval-dataset", "eval_datasets", default="wikitext2", show_default=True, callback=_csv(str),
              help="wikitext2, c4 or text/parquet files, comma-separated.")
@click.option("--eval-windows", type=click.IntRange(min=1), default=None, help="Evaluate only the first N windows.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench"), show_default=True,
              help="Report directory: report.json, report.md, report.png.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@verbosity
def bench(dense: str, pruned: str, backends: tuple[str, ...], device: str, batches: tuple[int, ...],
          prompt_lens: tuple[int, ...], new_tokens: int, repeats: int, warmup: int,
          precisions: tuple[str, ...] | None, with_eval: bool, eval_datasets: tuple[str, ...],
          eval_windows: int | None, out: Path, force: bool, progress: bool) -> None:
    """Tokens/s, latency and memory of dense vs pruned, interleaved, as JSON, Markdown and a plot."""
    from faspx.benchmarks.report import write_report
    from faspx.benchmarks.run import run_bench
    from faspx.outputs import atomic_dir, check_out

    check_out(out, force)  # before any work; the report is printed first, then written
    report = run_bench(dense, pruned, backends=backends, device=device, batches=batches, prompt_len=prompt_lens,
                       new_tokens=new_tokens, repeats=repeats, warmup=warmup, eval=with_eval,
                       eval_datasets=eval_datasets, max_windows=eval_windows, precisions=precisions,
                       progress=progress)
    echo_bench(report, out)
    with atomic_dir(out, force) as tmp:
        write_report(report, tmp)


def echo_bench(report: dict, out: Path) -> None:
    """The benchmark's key ratios and where its report is."""
    for entry in report["results"]:
        r = entry["ratios"]
        click.echo(f"  {entry['backend']} batch {entry['batch']} prompt {entry['prompt_len']}: pruned/dense decode "
                   "tokens/s "
                   f"{r['decode_tokens_per_s']:.3f}x, prefill {r['prefill_tokens_per_s']:.3f}x, "
                   f"end-to-end {r['end_to_end_tokens_per_s']:.3f}x")
        for name, q in (entry.get("ratios_vs_dense") or {}).items():
            if name != "pruned":
                click.echo(f"    {name}/dense decode tokens/s {q['decode_tokens_per_s']:.3f}x (bound "
                           f"{entry['ideal_vs_dense'][name]['decode_with_kv']:.3f}x), prefill "
                           f"{q['prefill_tokens_per_s']:.3f}x")
    click.echo(f"  ideal batch-1 decode speedup (weights read per token): "
               f"{report['roofline']['ideal_decode_speedup']:.3f}x")
    dense, pruned = report["dense"], report["pruned"]
    if dense.get("kv_values_per_token") and pruned["kv_values_per_token"] != dense["kv_values_per_token"]:
        ratio = pruned["kv_values_per_token"] / dense["kv_values_per_token"]
        click.echo(f"  KV cache per token: pruned/dense {ratio:.3f}x "
                   f"({pruned['attention_layers']} of {dense['attention_layers']} layers keep attention)")
    for row in report.get("perplexity") or []:
        others = "".join(f", {name} {row[name]:.3f}" for name in report["settings"].get("quantized") or [])
        click.echo(f"  perplexity ({row['dataset']}, {row['windows']} windows): dense {row['dense']:.3f}, "
                   f"pruned {row['pruned']:.3f}{others}")
    for flag in report.get("noise") or []:
        click.echo(f"  noise: {flag}")
    for skipped in report["skipped"]:
        click.echo(f"  skipped {skipped['backend']}: {skipped['reason']}")
    click.echo(f"report: {out / 'report.md'}  plot: {out / 'report.png'}")


if __name__ == "__main__":
    main()
