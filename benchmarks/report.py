"""The benchmark report: report.json (everything), report.md (tables and ratios), report.png (bars)."""

from __future__ import annotations

import json
from pathlib import Path

FIGURE_LABELS = {
    "prefill_tokens_per_s": ("prefill tokens/s", "{:.1f}"),
    "decode_tokens_per_s": ("decode tokens/s", "{:.2f}"),
    "time_to_first_token_s": ("time to first token (s)", "{:.4f}"),
    "per_token_latency_s": ("per-token latency (s)", "{:.4f}"),
    "end_to_end_tokens_per_s": ("end-to-end tokens/s", "{:.2f}"),
}


def write_report(report: dict, out: Path) -> dict[str, Path]:
    """Write the three files into ``out`` (which exists); return their paths."""
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "report.png"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def markdown(report: dict) -> str:
    """Tables of medians (with min-max spread) and pruned/dense ratios, per backend and batch."""
    s, env, roof = report["settings"], report["environment"], report["roofline"]
    lines = [
        "# faspx benchmark: dense vs pruned", "",
        f"`{env['command']}`", "",
        f"{env['device']} ({env['gpu'] or env['cpu']}, {env['cpu_threads']} threads), torch {env['torch']}, "
        f"transformers {env['transformers']}, onnxruntime {env['onnxruntime']}, {env['time']}.", "",
        f"Prompt {s['prompt_len']} tokens, {s['new_tokens']} new tokens (greedy, KV cache), {s['repeats']} "
        f"repeats after {s['warmup']} warm-up, dense and pruned interleaved (A B A B ...). Medians, [min-max].",
        "",
    ]
    for entry in report["results"]:
        d, p = entry["variants"]["dense"], entry["variants"]["pruned"]
        lines += [f"## {entry['backend']} on {entry['device']}, batch {entry['batch']}", "",
                  "| figure | dense | pruned | pruned/dense |", "|---|---|---|---|"]
        for key, (label, fmt) in FIGURE_LABELS.items():
            def cell(v, key=key, fmt=fmt):
                f = v["figures"][key]
                return f"{fmt.format(f['median'])} [{fmt.format(f['min'])}-{fmt.format(f['max'])}]"
            lines.append(f"| {label} | {cell(d)} | {cell(p)} | {entry['ratios'][key]:.3f} |")
        lines.append(f"| per-token latency p90 (s) | {d['figures']['per_token_latency_s']['p90']:.4f} | "
                     f"{p['figures']['per_token_latency_s']['p90']:.4f} | "
                     f"{p['figures']['per_token_latency_s']['p90'] / d['figures']['per_token_latency_s']['p90']:.3f} |")
        for key, label in (("kv_cache_bytes", "KV cache at full length"),
                           ("rss_load_delta_bytes", "RSS added by loading"),
                           ("cuda_peak_working_bytes", "CUDA peak working memory")):
            if key in d["memory"]:
                lines.append(f"| {label} | {_mb(d['memory'][key])} | {_mb(p['memory'][key])} | "
                             f"{p['memory'][key] / max(d['memory'][key], 1):.3f} |")
        lines.append("")
    lines += ["## Size and the roofline", "", "| | dense | pruned | pruned/dense |", "|---|---|---|---|"]
    for kind in ("hf", "onnx"):
        if kind in report["dense"]["disk_bytes"] and kind in report["pruned"]["disk_bytes"]:
            dn, pn = report["dense"]["disk_bytes"][kind], report["pruned"]["disk_bytes"][kind]
            lines.append(f"| {kind} on disk | {_mb(dn)} | {_mb(pn)} | {pn / dn:.3f} |")
    lines.append(f"| weight bytes read per decode step | {_mb(roof['dense_read_bytes'])} | "
                 f"{_mb(roof['pruned_read_bytes'])} | {roof['pruned_read_bytes'] / roof['dense_read_bytes']:.3f} |")
    lines += ["", f"Roofline: batch-1 decode reads every weight once per token, so the ideal pruned/dense decode "
              f"speedup is {roof['ideal_decode_speedup']:.3f}x."]
    for entry in report["results"]:
        if entry["batch"] == 1:
            lines.append(f"Measured ({entry['backend']}, batch 1): {entry['ratios']['decode_tokens_per_s']:.3f}x.")
    lines.append(f"\nPeak process RSS over the whole run: {_mb(report['peak_rss_bytes'])} (both variants were "
                 "loaded together; per-variant RSS is the increase measured when each was loaded).")
    if report["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s['backend']}: {s['reason']}" for s in report["skipped"]]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    if report.get("perplexity"):
        lines += ["", "## Perplexity", "", "| dataset | windows | dense | pruned | pruned/dense |",
                  "|---|---|---|---|---|"]
        for row in report["perplexity"]:
            lines.append(f"| {row['dataset']} | {row['max_windows'] or 'all'} x {row['seqlen']} | {row['dense']:.3f} | "
                         f"{row['pruned']:.3f} | {row['pruned'] / row['dense']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Bars: decode and prefill tokens/s per backend and batch, and memory, dense vs pruned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    labels = [f"{e['backend']}\nbatch {e['batch']}" for e in report["results"]]
    width = 0.38
    for ax, key, title in ((axes[0], "decode_tokens_per_s", "decode tokens/s"),
                           (axes[1], "prefill_tokens_per_s", "prefill tokens/s")):
        for k, (name, color) in enumerate((("dense", "#8a8a8a"), ("pruned", "#2b7bba"))):
            values = [e["variants"][name]["figures"][key]["median"] for e in report["results"]]
            xs = [i + (k - 0.5) * width for i in range(len(values))]
            bars = ax.bar(xs, values, width, label=name, color=color)
            if name == "pruned":
                for bar, e in zip(bars, report["results"], strict=True):
                    ax.annotate(f"{e['ratios'][key]:.2f}x", (bar.get_x() + width / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(f"{title} (median; ratio pruned/dense)")
        ax.legend()
    mem = [("hf on disk", report["dense"]["disk_bytes"].get("hf", 0), report["pruned"]["disk_bytes"].get("hf", 0)),
           ("weights read\nper token", report["roofline"]["dense_read_bytes"], report["roofline"]["pruned_read_bytes"])]
    if "onnx" in report["pruned"]["disk_bytes"]:
        mem.insert(1, ("onnx on disk", report["dense"]["disk_bytes"].get("onnx", 0),
                       report["pruned"]["disk_bytes"]["onnx"]))
    for k, (name, color) in enumerate((("dense", "#8a8a8a"), ("pruned", "#2b7bba"))):
        axes[2].bar([i + (k - 0.5) * width for i in range(len(mem))], [m[1 + k] / 2**20 for m in mem], width,
                    label=name, color=color)
    axes[2].set_xticks(range(len(mem)), [m[0] for m in mem])
    axes[2].set_title("memory (MiB)")
    axes[2].legend()
    fig.suptitle(f"faspx: {report['settings']['pruned']} vs {report['settings']['dense']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
