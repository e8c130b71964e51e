"""Timing primitives: one greedy generation's timings, interleaved repeats, and robust summaries.

The clock is injected, so the interleaving order and the medians are checked by tests with a fake
clock; nothing here asserts or assumes a speed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


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
                    clock: Callable[[], float] = time.perf_counter) -> Sample:
    """Time ``prefill()`` (it produces the first new token) and ``new_tokens - 1`` calls of ``step``.

    Both callables must return only once their work is done (synchronise the device inside them).
    """
    start = clock()
    state = prefill()
    sample = Sample(prefill_s=clock() - start)
    for _ in range(new_tokens - 1):
        start = clock()
        state = step(state)
        sample.step_s.append(clock() - start)
    return sample


def interleave(runs: dict[str, Callable[[], Sample]], repeats: int, warmup: int = 1
               ) -> tuple[dict[str, list[Sample]], list[str]]:
    """Warm every variant up, then run them in turn (A B A B ...) ``repeats`` times.

    Interleaving keeps a dense/pruned ratio honest when the machine's speed drifts (thermal, other
    load): both variants see the same drift. Returns the samples per variant and the order they ran.
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
    """Median, 90th percentile, min and max (the median is what reports compare)."""
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, max(0, round(0.9 * len(ordered)) - 1))]
    return {"median": statistics.median(ordered), "p90": p90, "min": ordered[0], "max": ordered[-1]}


def figures(samples: list[Sample], batch: int, prompt_len: int, new_tokens: int) -> dict[str, dict]:
    """Throughput and latency figures of one variant, each as a spread over its repeats.

    Decode latency pools every step of every repeat (per-token latency: median and p90).
    """
    steps = [s for sample in samples for s in sample.step_s]
    return {
        "prefill_tokens_per_s": spread([batch * prompt_len / s.prefill_s for s in samples]),
        "decode_tokens_per_s": spread([batch * len(s.step_s) / sum(s.step_s) for s in samples if s.step_s]),
        "time_to_first_token_s": spread([s.prefill_s for s in samples]),
        "per_token_latency_s": spread(steps),
        "end_to_end_tokens_per_s": spread([batch * new_tokens / s.total_s for s in samples]),
    }
