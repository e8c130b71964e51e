"""Accuracy sweep: perplexity of recipes at several sparsities, with timings.

Each row prunes a fresh copy of the model (loaded once) with a recipe (a preset of faspx.recipes, with
``--set FIELD=VALUE`` overrides applied to every row), distils where the recipe says so, and records
the `faspx prune` command that reproduces it.

Example (the reference settings: 128 x 2048 C4 calibration, all 148 WikiText-2 windows, bf16):
    python -m faspx.benchmarks.accuracy --model ~/.cache/faspx/smollm2-135m \\
        --calib ../shared/data/c4-validation-2k.parquet --eval ../shared/data/wikitext2-raw-v1-test.parquet \\
        --sparsities 0.2,0.3 --recipes paper,wanda,fast,quality,max --out benchmarks/results/recipes.json
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import click
import torch


def dense_forward_seconds(model, calib_ids: torch.Tensor, dtype: torch.dtype) -> float:
    """Wall time of one dense forward over all calibration tokens: the floor a pruning pass can't beat."""
    net = copy.deepcopy(model).to(dtype)
    start = time.perf_counter()
    with torch.no_grad():
        for sample in calib_ids:
            net(input_ids=sample.unsqueeze(0), use_cache=False)
    return time.perf_counter() - start


def parse_overrides(values: tuple[str, ...]) -> dict:
    """``FIELD=VALUE`` pairs as recipe overrides (values parsed as JSON where they can be: 0, 1e-4, true).

    Example:
        >>> parse_overrides(("distill=0", "damp=auto"))
        {'distill': 0, 'damp': 'auto'}
    """
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not FIELD=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cli_flags(recipe) -> str:
    """The `faspx prune` flags that give ``recipe``: --recipe PRESET and the fields that differ from it."""
    from faspx.recipes import PRESETS

    base_name = recipe.name.split("+")[0]
    base = PRESETS.get(base_name)
    if base is None:
        return "--recipe RECIPE.yaml"
    flags = [f"--recipe {base_name}"]
    for field, value in recipe.to_dict().items():
        if field == "name" or getattr(base, field) == value:
            continue
        if isinstance(value, bool):
            flags.append(f"--{'' if value else 'no-'}{field.replace('_', '-')}")
        else:
            flags.append(f"--{field.replace('_', '-')} {value}")
    return " ".join(flags)


@click.command()
@click.option("--model", "model_dir", required=True)
@click.option("--calib", required=True)
@click.option("--eval", "eval_source", required=True)
@click.option("--nsamples", type=int, default=128)
@click.option("--seqlen", type=int, default=2048)
@click.option("--eval-seqlen", type=int, default=2048)
@click.option("--max-windows", type=int, default=None)
@click.option("--sparsities", default="0.2,0.3")
@click.option("--recipes", "recipe_names", default="paper,wanda,fast,quality,max", show_default=True,
              help="Comma-separated presets (faspx.recipes).")
@click.option("--set", "overrides", multiple=True, help="FIELD=VALUE override of every recipe (repeatable).")
@click.option("--dtype", default="bfloat16", help="Forward dtype while pruning and evaluating.")
@click.option("--times-only", is_flag=True, help="Time the dense forward and each recipe; no perplexity (ppl null).")
@click.option("--retime-dense", is_flag=True, help="Time the dense forward again (the machine's load changed since "
              "--out's first rows); new rows' x dense forward use the new time.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="JSON results (appended per row).")
def main(model_dir, calib, eval_source, nsamples, seqlen, eval_seqlen, max_windows, sparsities, recipe_names,
         overrides, dtype, times_only, retime_dense, out):
    """Run the sweep and print a Markdown table; results land in --out as they come."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from faspx.adapters import adapter_for
    from faspx.benchmarks.memory import kv_bytes_per_token
    from faspx.data import calibration_ids, eval_ids
    from faspx.distill import distill
    from faspx.eval import perplexity
    from faspx.prune import prune, resolve_dtype
    from faspx.recipes import get_recipe

    recipes = [get_recipe(name, **parse_overrides(overrides)) for name in recipe_names.split(",")]
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
        if times_only:
            return None
        return perplexity(copy.deepcopy(model).to(fwd), test_ids, eval_seqlen, max_windows=max_windows)

    if retime_dense and ("dense", 0.0) in done:
        for row in results["rows"]:  # earlier rows keep the time they were compared with
            row.setdefault("dense_forward_s", results["dense_forward_s"])
        results["dense_forward_s"] = dense_forward_seconds(master, calib_ids, fwd)
        save()
    if ("dense", 0.0) not in done:
        results["dense_forward_s"] = dense_forward_seconds(master, calib_ids, fwd)
        results["rows"].append({"method": "dense", "sparsity": 0.0, "ppl": ppl(master), "seconds": 0.0})
        save()
    for s in (float(x) for x in sparsities.split(",")):
        for recipe in recipes:
            if (recipe.name, s) in done:
                continue
            model = copy.deepcopy(master)
            report = prune(model, calib_ids, s, recipe, dtype=fwd)
            layers = adapter_for(model.config).layers(model)
            seconds, distilled = report.seconds, None
            if recipe.distill:
                distilled = distill(model, master, calib_ids, recipe.distill, lr=recipe.distill_lr,
                                    step_tokens=recipe.distill_step_tokens, dtype=fwd).to_dict()
                seconds += distilled["seconds"]
            row = {"method": recipe.name, "sparsity": s, "ppl": ppl(model), "seconds": seconds,
                   "prune_seconds": report.seconds, "distill": distilled, "recipe": recipe.to_dict(),
                   "removed_fraction": report.removed_fraction, "n_remove": report.n_remove, "form": report.form,
                   "splits": report.splits, "layer_widths": report.layer_widths,
                   "attention_removed": report.attention_removed, "depth_seconds": report.depth_seconds,
                   "kv_bytes_per_token_bf16": kv_bytes_per_token(model.config, 2)
                   * (len(layers) - len(report.attention_removed or [])) // len(layers),
                   "dense_forward_s": results["dense_forward_s"],
                   "x_dense_forward": seconds / results["dense_forward_s"],
                   "command": f"faspx prune --model {model_dir} --sparsity {s} --calib {calib} "
                              f"--nsamples {nsamples} --seqlen {seqlen} --dtype {dtype} {cli_flags(recipe)} "
                              "--out OUT"}
            results["rows"].append(row)
            save()
            print(json.dumps(row), flush=True)
    if times_only:  # the rows printed above carry the times; the tables need perplexities
        return
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
                     f"{r['seconds']:.0f} | {r['seconds'] / r.get('dense_forward_s', floor):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
