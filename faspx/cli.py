"""The ``faspx`` command line: prune, eval (and the later stages' commands)."""

from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path

import click
import torch

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
        for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
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
        click.option("--structure", type=click.Choice(["fasp", "mlp"]), default="fasp", show_default=True,
                     help="fasp: FFN + V/O pairs at one ratio (the paper); mlp: the whole budget in the FFN."),
        click.option("--calib", default="wikitext2", show_default=True,
                     help="Calibration text: wikitext2, c4, or a .txt/.jsonl/.parquet file."),
        click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration windows."),
        click.option("--seqlen", type=int, default=2048, show_default=True,
                     help="Tokens per window (capped at the model's max positions)."),
        click.option("--no-restore", is_flag=True, help="Skip the least-squares restoration (structured Wanda)."),
        click.option("--damp", type=float, default=0.01, show_default=True,
                     help="Restoration damping, relative to mean(diag G[M,M])."),
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
              no_restore: bool, damp: float, device: str, dtype: str, seed: int, progress: bool):
    """Check the input, load the model, calibrate and prune. Returns (model, tokenizer, fasp_json)."""
    from faspx.budget import plan
    from faspx.data import calibration_ids
    from faspx.models import load_config, load_model, meta_model, revision
    from faspx.outputs import provenance
    from faspx.prune import prune, resolve_device, resolve_dtype

    config, adapter = load_config(model_name)
    # Cheap checks first: a bad sparsity must not cost a model load.
    plan(meta_model(config), adapter, sparsity, structure)
    if damp < 0:
        raise UsageError(f"--damp must be >= 0 (got {damp})")
    dev = resolve_device(device)
    fwd_dtype = resolve_dtype(dtype, dev)
    seqlen = min(seqlen, getattr(config, "max_position_embeddings", seqlen))
    log.info("loading %s", model_name)
    model, tokenizer, _ = load_model(model_name)
    log.info("calibration: %d x %d tokens of %s", nsamples, seqlen, calib)
    calib_ids = calibration_ids(tokenizer, calib, nsamples, seqlen, seed)
    log.info("pruning %d layers on %s in %s", len(adapter.layers(model)), dev, fwd_dtype)
    report = prune(model, calib_ids, sparsity, structure=structure, restore_weights=not no_restore, damp=damp,
                   device=dev, dtype=fwd_dtype, progress=progress)
    info = provenance(
        source_model=model_name, revision=revision(model), architecture=adapter.family,
        model_type=config.model_type, calibration={"source": calib, "nsamples": nsamples, "seqlen": seqlen,
                                                   "seed": seed},
        params=param_counts(model, adapter), **report.to_dict(),
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
    from faspx.outputs import atomic_dir, check_out, write_json

    check_out(out, force)
    start = time.perf_counter()
    model, tokenizer, info = run_prune(progress=progress, **options)
    with atomic_dir(out, force) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "fasp.json", info)
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
    """Perplexity on non-overlapping windows (the SparseGPT/Wanda protocol)."""
    from faspx.data import eval_ids
    from faspx.eval import perplexity
    from faspx.models import load_model
    from faspx.outputs import write_json
    from faspx.prune import resolve_device, resolve_dtype

    dev = resolve_device(device)
    model, tokenizer, _ = load_model(model_name, dtype=resolve_dtype(dtype, dev))
    ids = eval_ids(tokenizer, dataset)
    start = time.perf_counter()
    ppl = perplexity(model, ids, seqlen, max_windows=max_windows, device=dev, progress=progress)
    windows = min(ids.numel() // seqlen, max_windows or 10**9)
    result = {"model": model_name, "dataset": dataset, "seqlen": seqlen, "windows": windows,
              "perplexity": ppl, "seconds": time.perf_counter() - start}
    if json_out:
        write_json(json_out, result)
    click.echo(f"perplexity {ppl:.4f} ({dataset}, {windows} windows of {seqlen}, {model_name})")


if __name__ == "__main__":
    main()
