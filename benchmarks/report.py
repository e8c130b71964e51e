"""The benchmark report: report.json (everything), report.md (tables and ratios), report.png (bars)."""

from __future__ import annotations

import json
from pathlib import Path

FIGURE_LABELS = {
    "prefill_tokens_per_s": ("prefill tokens/s", "{:.1f}"),
    "decode_tokens_per_s": ("decode tokens/s", "{:.2f}"),
    "time_to_first_token_s": ("time to first token (s)", "{:.4f}"),
    "per_token_latency_s": ("per-token decode latency (s)", "{:.4f}"),
    "end_to_end_tokens_per_s": ("end-to-end tokens/s", "{:.2f}"),
}
MEMORY_LABELS = {
    "weight_bytes": "weights held",
    "kv_cache_bytes": "KV cache at the measured length",
    "kv_bytes_per_token": "KV cache per token",
    "rss_load_delta_bytes": "RSS added by loading",
    "rss_load_run_peak_bytes": "RSS peak of load + first run",
    "rss_run_peak_delta_bytes": "RSS peak of a run above its start",
    "cuda_load_delta_bytes": "GPU memory added by loading",
    "cuda_peak_allocated_bytes": "CUDA max_memory_allocated",
    "cuda_peak_reserved_bytes": "CUDA max_memory_reserved",
    "cuda_peak_working_bytes": "CUDA peak working memory",
    "vllm_rss_bytes": "RSS of the vLLM processes",
    "vllm_kv_pool_bytes": "KV pool vLLM reserved",
}
COLORS = {"dense": "#8a8a8a", "pruned": "#2b7bba", "pruned-int8": "#5aa55a", "pruned-int4": "#e08a2c"}


def write_report(report: dict, out: Path) -> dict[str, Path]:
    """Write report.json, report.md and report.png into ``out`` (which exists); return their paths."""
    out = Path(out)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "report.png"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def _ratio(pruned: float, dense: float) -> str:
    return f"{pruned / dense:.3f}" if dense else "n/a"


def _cell(spread: dict, fmt: str) -> str:
    return f"{fmt.format(spread['median'])} [{fmt.format(spread['min'])}, {fmt.format(spread['max'])}]"


def _environment_lines(env: dict) -> list[str]:
    v = env["versions"]
    libs = ", ".join(f"{name} {version}" for name, version in v.items() if version)
    where = f"GPU {env['gpu']}" if env.get("gpu") else "no GPU"
    return [f"`{env['command']}`", "",
            f"{env['cpu']} ({env['cpu_cores_logical']} logical cores, torch uses {env['torch_threads']} threads), "
            f"{where}; run on {env['device']}; {env['time']}.", "", libs + ".", ""]


def markdown(report: dict) -> str:
    """Tables of medians [min, max] and pruned/dense ratios of medians, per backend and batch; memory;
    size on disk; the roofline beside the measured decode ratio; skipped backends; notes; perplexity."""
    s, roof = report["settings"], report["roofline"]
    lengths = " and ".join(str(n) for n in s.get("prompt_lens") or [s["prompt_len"]])
    lines = ["# faspx benchmark: dense vs pruned", "", *_environment_lines(report["environment"])]
    lines += [f"Dense `{s['dense']}`, pruned `{s['pruned']}`. Random prompts of {lengths} tokens, "
              f"{s['new_tokens']} new tokens (greedy, KV cache). Each variant runs once untimed right after loading; "
              f"then per prompt length and batch size {s['warmup']} warm-up and {s['repeats']} timed runs per "
              "variant, dense and pruned "
              "interleaved (A B A B ...), so both see the same machine drift. "
              "Cells: median [min, max] over the repeats (per-token latency: over every decode step). Ratios are "
              "pruned/dense of the medians: above 1 is a gain for tokens/s, below 1 is a gain for latencies and "
              "memory.", ""]
    for entry in report["results"]:
        lines += _cell_table(entry)
    lines += ["## Size, weights and the roofline", "", "| | dense | pruned | pruned/dense |", "|---|---|---|---|"]
    dv, pv = report["dense"], report["pruned"]
    lines.append(f"| parameters stored | {dv['params']:,} | {pv['params']:,} | {_ratio(pv['params'], dv['params'])} |")
    lines.append(f"| weight bytes ({dv['dtype']} / {pv['dtype']}) | {_mb(dv['weight_bytes'])} | "
                 f"{_mb(pv['weight_bytes'])} | {_ratio(pv['weight_bytes'], dv['weight_bytes'])} |")
    for kind in ("hf", "onnx"):
        if kind in dv["disk_bytes"] and kind in pv["disk_bytes"]:
            dn, pn = dv["disk_bytes"][kind], pv["disk_bytes"][kind]
            lines.append(f"| {kind} weight files on disk | {_mb(dn)} | {_mb(pn)} | {_ratio(pn, dn)} |")
    lines.append(f"| weight bytes read per decode step | {_mb(roof['dense_read_bytes'])} | "
                 f"{_mb(roof['pruned_read_bytes'])} | {_ratio(roof['pruned_read_bytes'], roof['dense_read_bytes'])} |")
    if "kv_values_per_token" in dv:
        lines.append(f"| layers with attention | {dv['attention_layers']} | {pv['attention_layers']} | "
                     f"{_ratio(pv['attention_layers'], dv['attention_layers'])} |")
        lines.append(f"| KV cache values per token | {dv['kv_values_per_token']:,} | {pv['kv_values_per_token']:,} | "
                     f"{_ratio(pv['kv_values_per_token'], dv['kv_values_per_token'])} |")
    lines += ["", "Roofline: decode at batch 1 is bound by reading the weights (decoder layers + lm_head; the "
              "embedding tables give one row per token; zeroed-but-stored weights are read like the others), so the "
              f"ideal pruned/dense decode speedup is **{roof['ideal_decode_speedup']:.3f}x**. A prefill is bound by "
              "its FLOPs, nearly all in the decoder layers (the lm_head and attention scores are not pruned), so its "
              "speedup, and the end-to-end one, is at most the decoder layers' weight ratio, "
              f"**{roof.get('ideal_prefill_speedup', roof['ideal_decode_speedup']):.3f}x**.", "",
              "With the KV cache a decode step also reads every sequence's keys and values: the last column adds "
              "them at the cell's mean decode context (prompt + half the new tokens), in the backend's dtype. At a "
              "long prompt that column moves towards the KV ratio, which width pruning leaves at 1 and attention "
              "removal lowers.", "",
              "| backend, batch, prompt | measured decode speedup | ideal (weights) | ideal (weights + KV) |",
              "|---|---|---|---|"]
    for entry in report["results"]:
        with_kv = entry.get("ideal_decode_speedup_with_kv")
        lines.append(f"| {entry['backend']} on {entry['device']}, b{entry['batch']}, p{entry['prompt_len']} | "
                     f"{entry['ratios']['decode_tokens_per_s']:.3f}x | {roof['ideal_decode_speedup']:.3f}x | "
                     f"{f'{with_kv:.3f}x' if with_kv else '-'} |")
    if not report["results"]:
        lines.append("| (no run) | | | |")
    lines += ["", f"Process peak RSS over the whole run: {_mb(report['process_peak_rss_bytes'])}. It is monotone and "
              "covers both variants (held together for interleaving), every backend and any ONNX export; compare "
              "variants with the per-variant rows above.", "", "## Memory figures", ""]
    lines += [f"- `{key}`: {text}" for key, text in report["memory_definitions"].items()]
    if report["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s['backend']}{' batch ' + str(s['batch']) if 'batch' in s else ''}"
                                            f"{' prompt ' + str(s['prompt_len']) if 'prompt_len' in s else ''}: "
                                            f"{s['reason']}" for s in report["skipped"]]
    if report.get("noise"):
        lines += ["", "## Noise: rerun before quoting these", ""] + [f"- {n}" for n in report["noise"]]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    if report["settings"].get("quantized"):
        lines += _precision_tables(report)
    if report.get("perplexity"):
        names = [n for n in COLORS if n in report["perplexity"][0]]
        quantized = names[2:]  # each also against the float32 pruned model it was quantized from
        lines += ["", "## Perplexity", "", "dense and pruned in PyTorch (float32), quantized graphs in onnxruntime, "
                  "on the same windows.", "",
                  "| dataset | windows | " + " | ".join(names) + " | " + " | ".join(f"{n}/dense" for n in names[1:])
                  + "".join(f" | {n}/pruned" for n in quantized) + " |",
                  "|---|---|" + "---|" * (2 * len(names) - 1 + len(quantized))]
        for row in report["perplexity"]:
            lines.append(f"| {row['dataset']} | {row['windows']} x {row['seqlen']} | "
                         + " | ".join(f"{row[n]:.3f}" for n in names) + " | "
                         + " | ".join(_ratio(row[n], row["dense"]) for n in names[1:])
                         + "".join(f" | {_ratio(row[n], row['pruned'])}" for n in quantized) + " |")
    return "\n".join(lines) + "\n"


def _cell_table(entry: dict) -> list[str]:
    """One (backend, batch, prompt) cell: every variant's figures and memory, and each one's ratio to dense."""
    names = list(entry["variants"])
    vs = entry.get("ratios_vs_dense") or {"pruned": entry["ratios"]}
    v = {n: entry["variants"][n] for n in names}
    lines = [f"## {entry['backend']} on {entry['device']} ({entry['dtype']}), batch {entry['batch']}, "
             f"prompt {entry['prompt_len']}", "",
             "| figure | " + " | ".join(names) + " | " + " | ".join(f"{n}/dense" for n in names[1:]) + " |",
             "|---|" + "---|" * (2 * len(names) - 1)]
    for key, (label, fmt) in FIGURE_LABELS.items():
        lines.append(f"| {label} | " + " | ".join(_cell(v[n]["figures"][key], fmt) for n in names) + " | "
                     + " | ".join(f"{vs[n][key]:.3f}" for n in names[1:]) + " |")
    lines.append("| per-token decode latency p90 (s) | "
                 + " | ".join(f"{v[n]['figures']['per_token_latency_s']['p90']:.4f}" for n in names) + " | "
                 + " | ".join(f"{vs[n]['per_token_latency_p90_s']:.3f}" for n in names[1:]) + " |")
    for key, label in MEMORY_LABELS.items():
        size = (lambda n: f"{n:,} B") if key == "kv_bytes_per_token" else _mb
        if key in v["dense"]["memory"]:
            lines.append(f"| {label} | " + " | ".join(size(v[n]["memory"][key]) for n in names) + " | "
                         + " | ".join(_ratio(v[n]["memory"][key], v["dense"]["memory"][key]) for n in names[1:])
                         + " |")
    return lines + [""]


def _precision_tables(report: dict) -> list[str]:
    """The pruned build's quantized graphs against the dense float32 one: bytes on disk and read per
    step, the bound that gives, and the measured decode speedup of each ONNX cell."""
    names = ["dense", "pruned", *report["settings"]["quantized"]]
    dense_disk = report["dense"]["disk_bytes"].get("onnx")
    lines = ["", "## Precisions (ONNX graphs)", "",
             "Every ratio is against the dense float32 graph. Bytes read per decode step: every initializer but "
             "the lookup tables (a step reads one row), so packed weights, scales and zero points for MatMulNBits; "
             "the ideal decode speedup is the ratio of those bytes (the KV cache, float32 in every graph, adds the "
             "same to each pruned variant).", "",
             "| variant | quantization | ONNX weight files | /dense | bytes read per step | ideal decode vs dense |",
             "|---|---|---|---|---|---|"]
    for n in names:
        r = report[n]
        q = r.get("quantization") or {}
        mix = f", {q['eight_bit_matmuls']} linears 8-bit ({q['layout']})" if q and q.get("eight_bit_matmuls") else ""
        how = (f"{q['precision']}{mix}, block {q['block_size']}, accuracy level {q['accuracy_level']}, embeddings "
               f"{q['embeddings']}") if q else "float32"
        disk, read = r["disk_bytes"].get("onnx"), r.get("onnx_read_bytes")
        dense_read = report["dense"].get("onnx_read_bytes")
        lines.append(f"| {n} | {how} | {_mb(disk) if disk else '-'} | "
                     f"{_ratio(disk, dense_disk) if disk and dense_disk else '-'} | {_mb(read) if read else '-'} | "
                     f"{f'{dense_read / read:.3f}x' if read and dense_read else '-'} |")
    cells = [e for e in report["results"] if e.get("ratios_vs_dense")]
    if cells:
        lines += ["", "Measured decode tokens/s vs dense float32 (ideal with the KV cache at the cell's context in "
                  "brackets):", "", "| backend, batch, prompt | " + " | ".join(names[1:]) + " |",
                  "|---|" + "---|" * (len(names) - 1)]
        for e in cells:
            lines.append(f"| {e['backend']}, b{e['batch']}, p{e['prompt_len']} | "
                         + " | ".join(f"{e['ratios_vs_dense'][n]['decode_tokens_per_s']:.3f}x "
                                      f"({e['ideal_vs_dense'][n]['decode_with_kv']:.3f}x)" for n in names[1:]) + " |")
    return lines


def _bars(ax, labels: list[str], values: dict[str, list[float]], title: str,
          ratios: dict[str, list[str]] | None = None, errors: dict[str, list[tuple[float, float]]] | None = None
          ) -> None:
    """Grouped bars, one per variant in ``values`` (NaN: that variant has no bar there), each
    non-dense bar labelled with its ratio to dense."""
    width = 0.8 / len(values)
    for k, name in enumerate(values):
        xs = [i + (k - (len(values) - 1) / 2) * width for i in range(len(labels))]
        yerr = None
        if errors:
            yerr = [[0.0 if v != v else v - lo for v, (lo, _) in zip(values[name], errors[name], strict=True)],
                    [0.0 if v != v else hi - v for v, (_, hi) in zip(values[name], errors[name], strict=True)]]
        bars = ax.bar(xs, values[name], width, label=name, color=COLORS.get(name, "#444444"), yerr=yerr, capsize=3)
        for bar, text in zip(bars, (ratios or {}).get(name) or [""] * len(bars), strict=True):
            if text:
                ax.annotate(text, (bar.get_x() + width / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def plot(report: dict, path: Path) -> None:
    """Bars per backend and batch, dense vs pruned (and the pruned build's quantized graphs in the ONNX
    backends): decode, prefill and end-to-end tokens/s (median, min-max whiskers, ratio to dense on
    top), and memory (weights, disk, KV cache, RSS)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    results = report["results"]
    labels = [f"{e['backend']}\n{e['device']} b{e['batch']} p{e['prompt_len']}" for e in results]
    names = [n for n in COLORS if any(n in e["variants"] for e in results)] or ["dense", "pruned"]
    nan = float("nan")
    for ax, key, title in ((axes[0, 0], "decode_tokens_per_s", "decode tokens/s"),
                           (axes[0, 1], "prefill_tokens_per_s", "prefill tokens/s"),
                           (axes[1, 0], "end_to_end_tokens_per_s", "end-to-end tokens/s")):
        if not results:
            ax.text(0.5, 0.5, "no backend ran", ha="center", va="center")
            ax.set_title(title)
            continue
        fig_of = {n: [e["variants"][n]["figures"][key] if n in e["variants"] else None for e in results]
                  for n in names}
        values = {n: [f["median"] if f else nan for f in fig_of[n]] for n in names}
        errors = {n: [(f["min"], f["max"]) if f else (nan, nan) for f in fig_of[n]] for n in names}
        ratio_text = {n: [f"{(e.get('ratios_vs_dense') or {'pruned': e['ratios']})[n][key]:.2f}x"
                          if n in e["variants"] else "" for e in results] for n in names[1:]}
        _bars(ax, labels, values, f"{title} (median, min-max; ratio to dense)", ratio_text, errors)
    mem = [("weights\n(checkpoint)", report["dense"]["weight_bytes"], report["pruned"]["weight_bytes"]),
           ("read per\ndecode step", report["roofline"]["dense_read_bytes"], report["roofline"]["pruned_read_bytes"])]
    for kind in ("hf", "onnx"):
        if kind in report["dense"]["disk_bytes"] and kind in report["pruned"]["disk_bytes"]:
            mem.append((f"{kind}\non disk", report["dense"]["disk_bytes"][kind], report["pruned"]["disk_bytes"][kind]))
    for e in results:
        d, p = e["variants"]["dense"]["memory"], e["variants"]["pruned"]["memory"]
        if e is next(r for r in results if r["backend"] == e["backend"]):  # once per backend
            mem.append((f"{e['backend']}\nRSS load+run", d["rss_load_run_peak_bytes"], p["rss_load_run_peak_bytes"]))
        if "cuda_peak_working_bytes" in d:
            mem.append((f"{e['backend']} b{e['batch']}\nCUDA working", d["cuda_peak_working_bytes"],
                        p["cuda_peak_working_bytes"]))
    mib = {"dense": [m[1] / 2**20 for m in mem], "pruned": [m[2] / 2**20 for m in mem]}
    _bars(axes[1, 1], [m[0] for m in mem], mib, "memory (MiB; pruned/dense)",
          {"pruned": [_ratio(m[2], m[1]) + "x" for m in mem]})
    for ax in axes.flat:
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"faspx bench: {report['settings']['pruned']} vs {report['settings']['dense']} "
                 f"(ideal batch-1 decode speedup {report['roofline']['ideal_decode_speedup']:.2f}x)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
