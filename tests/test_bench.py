"""The benchmark stage: interleaving and medians with a fake clock, and a smoke run on tiny models."""

import math

import pytest
import torch
from click.testing import CliRunner

from benchmarks.backends import unavailable
from benchmarks.timing import Sample, figures, interleave, spread, time_generation
from faspx.cli import main
from tests.conftest import save_tiny


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float):
        self.now += seconds
        return seconds


def test_time_generation_times_prefill_and_each_step():
    clock = FakeClock()
    steps = iter([0.5, 0.25, 0.75])
    sample = time_generation(lambda: clock.advance(2.0), lambda _state: clock.advance(next(steps)), 4, clock)
    assert sample.prefill_s == 2.0 and sample.step_s == [0.5, 0.25, 0.75] and sample.total_s == 3.5


def test_interleave_alternates_after_warmup_and_medians_are_robust():
    clock = FakeClock()
    calls = []
    costs = {"dense": iter([9.0, 1.0, 5.0, 2.0]), "pruned": iter([9.0, 1.0, 100.0, 1.5])}

    def run(name):
        calls.append(name)
        prefill = next(costs[name])
        return time_generation(lambda: clock.advance(prefill), lambda _s: clock.advance(0.1), 3, clock)

    samples, order = interleave({"dense": lambda: run("dense"), "pruned": lambda: run("pruned")}, 3, warmup=1)
    assert calls == ["dense", "pruned"] * 4  # the warm-up round, then A B A B A B
    assert order == ["dense", "pruned"] * 3
    assert [s.prefill_s for s in samples["pruned"]] == [1.0, 100.0, 1.5]  # warm-up samples are dropped
    ttft = figures(samples["pruned"], batch=2, prompt_len=10, new_tokens=3)["time_to_first_token_s"]
    assert ttft["median"] == 1.5 and ttft["max"] == 100.0  # one slow outlier does not move the median
    prefill = figures(samples["dense"], 2, 10, 3)["prefill_tokens_per_s"]
    assert prefill["median"] == pytest.approx(20 / 2.0)


def test_figures_count_tokens_per_batch():
    sample = Sample(prefill_s=0.5, step_s=[0.1, 0.1, 0.2])
    f = figures([sample], batch=4, prompt_len=16, new_tokens=4)
    assert f["prefill_tokens_per_s"]["median"] == pytest.approx(4 * 16 / 0.5)
    assert f["decode_tokens_per_s"]["median"] == pytest.approx(4 * 3 / 0.4)
    assert f["end_to_end_tokens_per_s"]["median"] == pytest.approx(4 * 4 / 0.9)
    assert f["per_token_latency_s"]["p90"] == pytest.approx(0.2)
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "p90": 3.0, "min": 1.0, "max": 3.0}


def test_vllm_without_gpu_is_skipped_with_a_reason():
    reason = unavailable("vllm", torch.device("cpu"))
    assert reason and "GPU" in reason


def _walk(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)
    else:
        yield node


def test_bench_smoke_on_tiny_models(tmp_path, opt_tokenizer, text_file, monkeypatch):
    import json

    import matplotlib.image

    import benchmarks.run

    monkeypatch.setattr(benchmarks.run, "ONNX_CACHE", tmp_path / "onnx-cache")
    dense = save_tiny("llama", tmp_path / "dense", opt_tokenizer)
    build = tmp_path / "build"
    runner = CliRunner()
    result = runner.invoke(main, ["build", "--model", str(dense), "--sparsity", "0.3", "--structure", "mlp",
                                  "--calib", str(text_file), "--nsamples", "4", "--seqlen", "64", "--out", str(build),
                                  "-q"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "report"
    result = runner.invoke(main, ["bench", "--dense", str(dense), "--pruned", str(build), "--backend",
                                  "torch,onnxruntime,vllm", "--batch", "1,2", "--prompt-len", "8", "--new-tokens", "4",
                                  "--repeats", "2", "--eval", str(text_file), "--eval-windows", "1", "--out", str(out),
                                  "-q"])
    assert result.exit_code == 0, result.output
    assert "report.md" in result.output and "decode tokens/s" in result.output
    report = json.loads((out / "report.json").read_text())
    assert [(e["backend"], e["batch"]) for e in report["results"]] == [
        ("torch", 1), ("torch", 2), ("onnxruntime", 1), ("onnxruntime", 2)]
    for entry in report["results"]:
        for variant in entry["variants"].values():
            assert set(variant["figures"]) == {"prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s",
                                               "per_token_latency_s", "end_to_end_tokens_per_s"}
            assert len(variant["samples"]) == 2 and variant["memory"]["kv_cache_bytes"] > 0
            for value in _walk(variant["figures"]):
                assert math.isfinite(value) and value > 0
        assert all(math.isfinite(r) and r > 0 for r in entry["ratios"].values())
    assert report["skipped"] == [{"backend": "vllm", "reason": unavailable("vllm", torch.device("cpu"))}]
    assert any("exported it" in n for n in report["notes"])  # the dense model had no ONNX export
    assert report["pruned"]["disk_bytes"]["onnx"] < report["dense"]["disk_bytes"]["onnx"]
    assert report["roofline"]["ideal_decode_speedup"] > 1
    assert report["perplexity"][0]["dense"] > 1 and report["perplexity"][0]["pruned"] > 1
    assert report["peak_rss_bytes"] > 0 and report["environment"]["torch"] == torch.__version__
    md = (out / "report.md").read_text()
    assert "Roofline" in md and "## Skipped" in md and "pruned/dense" in md
    image = matplotlib.image.imread(out / "report.png")
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


def test_bench_needs_a_model_directory(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--dense", str(tmp_path), "--pruned", str(tmp_path),
                                       "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "config.json" in result.output
