"""Accuracy sweep: perplexity of every pruning method at several sparsities, with timings.

Reproduces the reference table of issue 6 (paper FASP, structured Wanda, the MLP-only structure)
and adds a row per faspx option and their combination. Each row records the `faspx prune` command
that reproduces it. The model is loaded once; each row prunes a fresh copy.

Example (the reduced settings that fit a 2-core machine; the paper's are 128 x 2048 and all windows):
    python -m benchmarks.accuracy --model ~/.cache/faspx/smollm2-135m \\
        --calib ../shared/data/c4-validation-2k.parquet --eval ../shared/data/wikitext2-raw-v1-test.parquet \\
        --nsamples 32 --seqlen 2048 --max-windows 40 --sparsities 0.2 --methods paper,wanda,mlp,best \\
        --out out/accuracy.json
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import click
import torch

from faspx.distill import STEP_TOKENS

# name -> (prune() keyword arguments, the matching `faspx prune` flags)
METHODS: dict[str, tuple[dict, str]] = {
    "paper": ({}, ""),
    "paper-noguard": ({"guard": False}, "--no-guard"),
    "wanda": ({"restore_weights": False}, "--no-restore"),
    "mlp": ({"structure": "mlp"}, "--structure mlp"),
    "damp1e-3": ({"damp": 1e-3}, "--damp 0.001"),
    "damp-auto": ({"damp": "auto"}, "--damp auto"),
    "obs": ({"selection": "obs"}, "--selection obs"),
    "dense-target": ({"target": "dense"}, "--restore-target dense"),
    "mlp+obs": ({"structure": "mlp", "selection": "obs"}, "--structure mlp --selection obs"),
    "mlp+dense-target": ({"structure": "mlp", "target": "dense"}, "--structure mlp --restore-target dense"),
    "mlp+damp-auto": ({"structure": "mlp", "damp": "auto"}, "--structure mlp --damp auto"),
    "mlp+obs+damp-auto": ({"structure": "mlp", "selection": "obs", "damp": "auto"},
                          "--structure mlp --selection obs --damp auto"),
    "mlp+bias": ({"structure": "mlp", "bias": True}, "--structure mlp --bias"),
    "mlp+damp-auto+bias": ({"structure": "mlp", "damp": "auto", "bias": True}, "--structure mlp --damp auto --bias"),
    "auto": ({"structure": "auto"}, "--structure auto"),
    "auto+damp-auto": ({"structure": "auto", "damp": "auto"}, "--structure auto --damp auto"),
    "all": ({"structure": "mlp", "selection": "obs", "target": "dense", "damp": "auto", "bias": True},
            "--structure mlp --selection obs --restore-target dense --damp auto --bias"),
    # per-layer FFN widths (nemotron-nas export, not stock transformers)
    "per-layer": ({"ffn_widths": "per-layer"}, "--ffn-widths per-layer"),
    "mlp+damp-auto+per-layer": ({"structure": "mlp", "damp": "auto", "ffn_widths": "per-layer"},
                                "--structure mlp --damp auto --ffn-widths per-layer"),
    "mlp+damp-auto+per-layer+distill": ({"structure": "mlp", "damp": "auto", "ffn_widths": "per-layer",
                                         "distill": True}, "--structure mlp --damp auto --ffn-widths per-layer"),
    # "distill": then distil from the dense model on --distill-samples calibration windows (faspx.distill);
    # the row is named after that number (mlp+damp-auto+distill64)
    "paper+distill": ({"distill": True}, ""),
    "mlp+damp-auto+distill": ({"structure": "mlp", "damp": "auto", "distill": True}, "--structure mlp --damp auto"),
    "mlp+obs+damp-auto+distill": ({"structure": "mlp", "selection": "obs", "damp": "auto", "distill": True},
                                  "--structure mlp --selection obs --damp auto"),
}


def dense_forward_seconds(model, calib_ids: torch.Tensor, dtype: torch.dtype) -> float:
    """Wall time of one dense forward over all calibration tokens: the floor a pruning pass can't beat."""
    net = copy.deepcopy(model).to(dtype)
    start = time.perf_counter()
    with torch.no_grad():
        for sample in calib_ids:
            net(input_ids=sample.unsqueeze(0), use_cache=False)
    return time.perf_counter() - start


@click.command()
@click.option("--model", "model_dir", required=True)
@click.option("--calib", required=True)
@click.option("--eval", "eval_source", required=True)
@click.option("--nsamples", type=int, default=128)
@click.option("--seqlen", type=int, default=2048)
@click.option("--eval-seqlen", type=int, default=2048)
@click.option("--max-windows", type=int, default=None)
@click.option("--sparsities", default="0.1,0.2,0.3")
@click.option("--methods", default=",".join(METHODS))
@click.option("--dtype", default="bfloat16", help="Forward dtype while pruning and evaluating.")
@click.option("--distill-samples", type=int, default=32, show_default=True,
              help="Calibration windows the +distill methods distil on.")
@click.option("--distill-lr", type=float, default=1e-4, show_default=True,
              help="Peak learning rate of the +distill methods; rows with another than 1e-4 are named after it.")
@click.option("--distill-step-tokens", type=int, default=STEP_TOKENS, show_default=True,
              help="Tokens per distillation step; rows with another than 2048 (one step per window, the only "
                   "choice before) are named after it.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="JSON results (appended per row).")
def main(model_dir, calib, eval_source, nsamples, seqlen, eval_seqlen, max_windows, sparsities, methods, dtype,
         distill_samples, distill_lr, distill_step_tokens, out):
    """Run the sweep and print a Markdown table; results land in --out as they come."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from faspx.data import calibration_ids, eval_ids
    from faspx.distill import distill
    from faspx.eval import perplexity
    from faspx.prune import prune, resolve_dtype

    fwd = resolve_dtype(dtype, torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    master = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    calib_ids = calibration_ids(tokenizer, calib, nsamples, seqlen, seed=0)
    test_ids = eval_ids(tokenizer, eval_source)
    results = json.loads(out.read_text()) if out.exists() else {"rows": []}
    results["settings"] = {"model": str(model_dir), "calib": calib, "nsamples": nsamples, "seqlen": seqlen,
                           "eval": eval_source, "eval_seqlen": eval_seqlen, "max_windows": max_windows,
                           "dtype": dtype, "threads": torch.get_num_threads()}
    done = {(r["method"], r["sparsity"]) for r in results["rows"]}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    def ppl(model):
        return perplexity(copy.deepcopy(model).to(fwd), test_ids, eval_seqlen, max_windows=max_windows)

    if ("dense", 0.0) not in done:
        results["dense_forward_s"] = dense_forward_seconds(master, calib_ids, fwd)
        results["rows"].append({"method": "dense", "sparsity": 0.0, "ppl": ppl(master), "seconds": 0.0})
        save()
    for s in (float(x) for x in sparsities.split(",")):
        for name in methods.split(","):
            kwargs, flags = METHODS[name]
            lr_tag = "" if distill_lr == 1e-4 else f"-lr{distill_lr:g}"
            step_tag = "" if distill_step_tokens == 2048 else f"-step{distill_step_tokens}"
            row_name = (name.replace("+distill", f"+distill{distill_samples}{lr_tag}{step_tag}")
                        if kwargs.get("distill") else name)
            if (row_name, s) in done:
                continue
            model = copy.deepcopy(master)
            report = prune(model, calib_ids, s, dtype=fwd, **{k: v for k, v in kwargs.items() if k != "distill"})
            seconds, distilled = report.seconds, None
            if kwargs.get("distill"):
                distilled = distill(model, master, calib_ids, distill_samples, lr=distill_lr,
                                    step_tokens=distill_step_tokens, dtype=fwd).to_dict()
                seconds += distilled["seconds"]
                flags = (f"{flags} --distill {distill_samples}" + (f" --distill-lr {distill_lr:g}" if lr_tag else "")
                         + f" --distill-step-tokens {distill_step_tokens}")
            row = {"method": row_name, "sparsity": s, "ppl": ppl(model), "seconds": seconds,
                   "prune_seconds": report.seconds, "distill": distilled,
                   "removed_fraction": report.removed_fraction, "n_remove": report.n_remove,
                   "splits": report.splits, "layer_widths": report.layer_widths,
                   "command": f"faspx prune --model {model_dir} --sparsity {s} --calib {calib} "
                              f"--nsamples {nsamples} --seqlen {seqlen} --dtype {dtype} {flags} --out OUT".strip()}
            results["rows"].append(row)
            save()
            print(json.dumps(row), flush=True)
    print(markdown(results))
    print(by_sparsity(results))


def by_sparsity(results: dict) -> str:
    """One line per method, one column per sparsity: ppl (x dense); '-' where a row was not run."""
    dense = next(r["ppl"] for r in results["rows"] if r["method"] == "dense")
    rows = [r for r in results["rows"] if r["method"] != "dense"]
    levels = sorted({r["sparsity"] for r in rows})
    ppl = {(r["method"], r["sparsity"]): r["ppl"] for r in rows}
    lines = ["| method | " + " | ".join(f"s = {s:g}" for s in levels) + " |", "|---" * (len(levels) + 1) + "|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = [f"{ppl[method, s]:.2f} ({ppl[method, s] / dense:.2f}x)" if (method, s) in ppl else "-"
                 for s in levels]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The sweep as a Markdown table: ppl, x dense, pruning time / dense forward."""
    dense = next(r["ppl"] for r in results["rows"] if r["method"] == "dense")
    floor = results.get("dense_forward_s") or float("nan")
    lines = ["| method | s | ppl | x dense | prune s | x dense fwd |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['method']} | {r['sparsity']} | {r['ppl']:.2f} | {r['ppl'] / dense:.2f} | "
                     f"{r['seconds']:.0f} | {r['seconds'] / floor:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
