"""Timing primitives: one greedy generation's timings, interleaved repeats, robust summaries, ratios.

The clock is injected, so the interleaving order, the medians and the ratios are checked by tests
with a fake clock; nothing here asserts or assumes a speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Sample:
    """One generation: the prefill (which yields the first token) and each later decode step."""

    prefill_s: float
    step_s: list[float] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return self.prefill_s + sum(self.step_s)

    def to_dict(self) -> dict:
        return {**asdict(self), "total_s": self.total_s}


def time_generation(prefill: Callable[[], object], step: Callable[[object], object], new_tokens: int,
                    clock: Callable[[], float] = time.perf_counter,
                    at_end: Callable[[object], None] | None = None) -> Sample:
    """Time ``prefill()`` (it produces the first new token) and ``new_tokens - 1`` calls of ``step``.

    Both callables must return only once their work is done (synchronise the device inside them).
    ``at_end(state)``, untimed, sees the last state while it (the full KV cache) is still alive:
    that is where memory is measured.
    """
    start = clock()
    state = prefill()
    sample = Sample(prefill_s=clock() - start)
    for _ in range(new_tokens - 1):
        start = clock()
        state = step(state)
        sample.step_s.append(clock() - start)
    if at_end is not None:
        at_end(state)
    return sample


def interleave(runs: dict[str, Callable[[], Sample]], repeats: int, warmup: int = 1
               ) -> tuple[dict[str, list[Sample]], list[str]]:
    """Warm every variant up, then run them in turn (A B A B ...) ``repeats`` times.

    Interleaving keeps a dense/pruned ratio honest when the machine's speed drifts (thermal, other
    load): both variants see the same drift. Warm-up samples are dropped. Returns the samples per
    variant and the order the timed runs ran in.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    samples: dict[str, list[Sample]] = {name: [] for name in runs}
    order: list[str] = []
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(run())
            order.append(name)
    return samples, order


def spread(values: list[float]) -> dict[str, float]:
    """Median (what reports compare), quartiles, 90th percentile, min and max, and the count.

    Percentiles interpolate linearly between the sorted values (numpy's default).
    """
    v = np.asarray(values, dtype=np.float64)
    q1, median, q3, p90 = (float(x) for x in np.percentile(v, [25, 50, 75, 90]))
    return {"median": median, "q1": q1, "q3": q3, "p90": p90, "min": float(v.min()), "max": float(v.max()),
            "n": int(v.size)}


FIGURES = ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s", "per_token_latency_s",
           "end_to_end_tokens_per_s")


def figures(samples: list[Sample], batch: int, prompt_len: int, new_tokens: int) -> dict[str, dict]:
    """Throughput and latency figures of one variant, each as a spread over its repeats.

    Token counts include the batch (tokens/s of the whole batch). Prefill tokens/s is prompt tokens
    over the prefill time; time to first token is that prefill time (it yields the first token).
    Decode tokens/s counts the ``new_tokens - 1`` steps after it; per-token decode latency pools
    every step of every repeat (median and p90 of single steps). End-to-end is all new tokens over
    the whole generation.
    """
    steps = [s for sample in samples for s in sample.step_s]
    return {
        "prefill_tokens_per_s": spread([batch * prompt_len / s.prefill_s for s in samples]),
        "decode_tokens_per_s": spread([batch * len(s.step_s) / sum(s.step_s) for s in samples]),
        "time_to_first_token_s": spread([s.prefill_s for s in samples]),
        "per_token_latency_s": spread(steps),
        "end_to_end_tokens_per_s": spread([batch * new_tokens / s.total_s for s in samples]),
    }


def ratios(dense: dict[str, dict], pruned: dict[str, dict]) -> dict[str, float]:
    """pruned/dense of each figure's median (and of the per-token latency's p90)."""
    out = {key: pruned[key]["median"] / dense[key]["median"] for key in dense}
    out["per_token_latency_p90_s"] = pruned["per_token_latency_s"]["p90"] / dense["per_token_latency_s"]["p90"]
    return out


# Speed ratios that pruning can raise at most as much as it cuts what bounds them: the weight bytes a
# decode step reads; the decoder layers' FLOPs for a prefill (and for end to end, a mix of both phases).
DECODE_BOUNDED = ("decode_tokens_per_s",)
PREFILL_BOUNDED = ("prefill_tokens_per_s", "end_to_end_tokens_per_s")
MAX_SPREAD = 0.30


def noise_flags(results: list[dict], ideal: float, ideal_prefill: float | None = None,
                max_spread: float = MAX_SPREAD) -> list[str]:
    """What in ``results`` is noise, not a measurement: a pruned/dense decode ratio above ``ideal`` (the
    weight-bytes roofline; pruning cannot do better), a prefill or end-to-end ratio above
    ``ideal_prefill`` (the decoder layers' weight ratio; ``ideal`` when not given), a quantized
    graph's decode ratio vs dense above the ratio of the bytes the two graphs read per step
    (``ideal_vs_dense``; its prefill may beat the float32 FLOPs with int8 compute, so it is not
    bounded), or a figure whose min-max spread over its repeats exceeds ``max_spread`` of its median.

    Example:
        >>> cell = {"backend": "torch", "batch": 1, "ratios": {"decode_tokens_per_s": 1.5},
        ...         "variants": {"dense": {"figures": {"decode_tokens_per_s": spread([9.0, 10.0, 11.0])}}}}
        >>> [f.split(":")[0] for f in noise_flags([cell], ideal=1.3)]
        ['torch batch 1']
    """
    bounds = [(key, ideal, "weight-bytes roofline") for key in DECODE_BOUNDED]
    bounds += [(key, ideal_prefill or ideal, "decoder-layer FLOPs bound") for key in PREFILL_BOUNDED]
    flags = []
    for entry in results:
        where = f"{entry['backend']} batch {entry['batch']}" + (f" prompt {entry['prompt_len']}"
                                                                 if "prompt_len" in entry else "")
        for key, bound, what in bounds:
            if key in DECODE_BOUNDED:  # a cache that lost layers (2SSP) is read faster too: the bound with it
                bound = max(bound, entry.get("ideal_decode_speedup_with_kv") or 0)
            ratio = entry["ratios"].get(key)
            if ratio is not None and ratio > bound:
                flags.append(f"{where}: pruned/dense {key} {ratio:.3f}x is above the {what} {bound:.3f}x, which "
                             "pruning cannot beat: noise (a loaded machine?); rerun with more --repeats on an idle "
                             "one")
        for name, bound in (entry.get("ideal_vs_dense") or {}).items():  # a quantized graph reads fewer bytes
            ratio = entry["ratios_vs_dense"][name]["decode_tokens_per_s"]
            bound = max(bound["decode"], bound["decode_with_kv"])
            if name != "pruned" and ratio > bound:
                flags.append(f"{where}: {name}/dense decode_tokens_per_s {ratio:.3f}x is above the bytes-read bound "
                             f"{bound:.3f}x of the two graphs: noise; rerun with more --repeats on an idle one")
        for name, variant in entry["variants"].items():
            for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
                s = variant["figures"].get(key)
                if s and s["median"] > 0 and (s["max"] - s["min"]) / s["median"] > max_spread:
                    flags.append(f"{where}: the {name} model's {key} spread over its repeats is "
                                 f"{(s['max'] - s['min']) / s['median']:.0%} of the median (> {max_spread:.0%}): "
                                 "noise; rerun with more --repeats on an idle machine")
    return flags
