"""Where the calibration Gram matrices get their energy: the first token of each window (the attention
sink, whose activations are orders of magnitude larger in some layers) against all the others.

FASP's damping is relative to mean(diag G) and its score reads ||X_j||, so a layer where one token
carries nearly all of G's trace is restored and scored for that token. This prints, per layer and
pair, the share of tr(G) that the first tokens carry, max/mean of diag G, and how many channels hold
90 % of the first tokens' energy.

Example:
    python -m faspx.benchmarks.activations --model ~/.cache/faspx/smollm2-135m \\
        --calib ../shared/data/c4-validation-2k.parquet --nsamples 8 --seqlen 512
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch


@torch.no_grad()
def first_token_shares(model, calib_ids: torch.Tensor) -> list[dict]:
    """One row per (layer, pair) with the first-token share of tr(G) at the pair consumer's input."""
    from faspx.adapters import adapter_for

    adapter = adapter_for(model.config)
    pairs = adapter.pairs(model.config)
    sums: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    def hook(key):
        def grab(_module, args):
            x = args[0][0].double()  # (seqlen x in_features) of one sample
            acc = sums.setdefault(key, {"all": torch.zeros(x.shape[1], dtype=torch.float64),
                                        "first": torch.zeros(x.shape[1], dtype=torch.float64)})
            acc["all"] += x.pow(2).sum(0)
            acc["first"] += x[0].pow(2)
        return grab

    handles = [layer.get_submodule(p.consumer).register_forward_pre_hook(hook((i, p.name)))
               for i, layer in enumerate(adapter.layers(model)) for p in pairs]
    try:
        for sample in calib_ids:
            model(input_ids=sample.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for (layer, pair), acc in sorted(sums.items()):
        first = acc["first"].sort(descending=True).values
        rows.append({
            "layer": layer, "pair": pair,
            "first_token_share": float(acc["first"].sum() / acc["all"].sum()),
            "max_over_mean_diag": float(acc["all"].max() / acc["all"].mean()),
            "first_token_channels_90": int((first.cumsum(0) < 0.9 * first.sum()).sum()) + 1,
        })
    return rows


@click.command()
@click.option("--model", "model_dir", required=True)
@click.option("--calib", required=True)
@click.option("--nsamples", type=int, default=8)
@click.option("--seqlen", type=int, default=512)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the rows as JSON.")
def main(model_dir, calib, nsamples, seqlen, out):
    """Print the table (Markdown) for one model and calibration set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from faspx.data import calibration_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = first_token_shares(model, calibration_ids(tokenizer, calib, nsamples, seqlen, seed=0))
    print("| layer | pair | first-token share of tr(G) | max/mean diag G | channels with 90 % of it |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['pair']} | {r['first_token_share']:.3f} | {r['max_over_mean_diag']:.0f} | "
              f"{r['first_token_channels_90']} |")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": model_dir, "nsamples": nsamples, "seqlen": seqlen, "rows": rows},
                                  indent=2) + "\n")


if __name__ == "__main__":
    main()
