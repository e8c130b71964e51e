"""The benchmark stage: interleaving, medians and ratios with a fake clock; skipped backends; a smoke
run of torch and onnxruntime on tiny models through the CLI. No timing is asserted anywhere."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import faspx.benchmarks.run
from faspx.benchmarks.backends import unavailable
from faspx.benchmarks.report import write_report
from faspx.benchmarks.run import run_bench
from faspx.benchmarks.timing import Sample, figures, interleave, ratios, spread, time_generation
from faspx.cli import main
from tests.conftest import TINY_CONFIGS, recipe, save_tiny


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return seconds


def test_time_generation_times_prefill_and_each_step():
    clock = FakeClock()
    steps = iter([0.5, 0.25, 0.75])
    seen = []
    sample = time_generation(lambda: clock.advance(2.0), lambda _state: clock.advance(next(steps)), 4, clock,
                             at_end=seen.append)
    assert sample.prefill_s == 2.0 and sample.step_s == [0.5, 0.25, 0.75] and sample.total_s == 3.5
    assert seen == [0.75]  # the last state, handed over once the timing is done


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
    assert ttft["median"] == 1.5 and ttft["max"] == 100.0 and ttft["min"] == 1.0  # an outlier leaves the median
    prefill = figures(samples["dense"], 2, 10, 3)["prefill_tokens_per_s"]
    assert prefill["median"] == pytest.approx(20 / 2.0)


def test_figures_count_tokens_per_batch_and_ratios_are_of_medians():
    sample = Sample(prefill_s=0.5, step_s=[0.1, 0.1, 0.2])
    f = figures([sample], batch=4, prompt_len=16, new_tokens=4)
    assert f["prefill_tokens_per_s"]["median"] == pytest.approx(4 * 16 / 0.5)
    assert f["decode_tokens_per_s"]["median"] == pytest.approx(4 * 3 / 0.4)
    assert f["end_to_end_tokens_per_s"]["median"] == pytest.approx(4 * 4 / 0.9)
    assert f["time_to_first_token_s"]["median"] == 0.5
    assert f["per_token_latency_s"]["median"] == pytest.approx(0.1)
    assert f["per_token_latency_s"]["p90"] == pytest.approx(0.18)  # linear interpolation of 0.1, 0.1, 0.2
    assert spread([4.0, 1.0, 3.0, 2.0, 5.0]) == {"median": 3.0, "q1": 2.0, "q3": 4.0, "p90": pytest.approx(4.6),
                                                 "min": 1.0, "max": 5.0, "n": 5}
    slow = figures([Sample(1.0, [0.2, 0.2, 0.4])], batch=4, prompt_len=16, new_tokens=4)
    r = ratios(slow, f)
    assert r["decode_tokens_per_s"] == pytest.approx(2.0) and r["time_to_first_token_s"] == pytest.approx(0.5)
    assert r["per_token_latency_p90_s"] == pytest.approx(0.5)


@pytest.fixture
def tiny_dirs(tmp_path):
    """A dense and a 'pruned' (narrower FFN) tiny LLaMA, saved as plain HF directories (no tokenizer)."""
    dirs = {}
    for name, ffn in (("dense", 160), ("pruned", 96)):
        config = TINY_CONFIGS["llama"]()
        config.intermediate_size = ffn
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    return dirs


class FakeRunner:
    """Stands in for a backend: each generation advances a fake clock by scripted amounts."""

    def __init__(self, name: str, clock: FakeClock, log: list, prefill: list[float], step: float):
        self.name, self.clock, self.log, self.prefill, self.step = name, clock, log, iter(prefill), step
        self.device, self.dtype, self.kv_bytes_per_value, self.weight_bytes = "cpu", "float32", 4, 1000

    def sample(self, ids, new_tokens, clock, at_end=None):
        assert clock is self.clock  # run_bench hands its clock down to the backend
        self.log.append((self.name, ids.shape[0]))
        prefill = next(self.prefill)
        return time_generation(lambda: self.clock.advance(prefill), lambda _s: self.clock.advance(self.step),
                               new_tokens, clock, at_end)


def test_run_bench_interleaves_and_reports_medians_with_a_fake_clock(tiny_dirs, monkeypatch):
    clock, calls = FakeClock(), []
    script = {  # the run after loading, then per batch: warm-up and 3 timed runs; pruned has one slow outlier
        "dense": [70.0] + [50.0, 2.0, 4.0, 3.0] * 2,
        "pruned": [70.0] + [50.0, 1.0, 90.0, 1.5] * 2,
    }
    steps = {"dense": 0.5, "pruned": 0.25}

    def fake_load(backend, source, device, max_len):
        name = source.name
        return FakeRunner(name, clock, calls, script[name], steps[name])

    monkeypatch.setattr(faspx.benchmarks.run, "load_runner", fake_load)
    report = run_bench(tiny_dirs["dense"], tiny_dirs["pruned"], backends=("torch",), device="cpu", batches=(1, 2),
                       prompt_len=4, new_tokens=3, repeats=3, warmup=1, progress=False, clock=clock)
    one_batch = ["dense", "pruned"] * 4  # the warm-up pair, then A B A B A B
    assert calls == [("dense", 1), ("pruned", 1)] + [(n, 1) for n in one_batch] + [(n, 2) for n in one_batch]
    for entry, batch in zip(report["results"], (1, 2), strict=True):
        assert entry["batch"] == batch and entry["order"] == ["dense", "pruned"] * 3
        dense, pruned = entry["variants"]["dense"], entry["variants"]["pruned"]
        assert [s["prefill_s"] for s in dense["samples"]] == [2.0, 4.0, 3.0]  # warm-up dropped
        assert dense["figures"]["time_to_first_token_s"]["median"] == 3.0
        assert pruned["figures"]["time_to_first_token_s"]["median"] == 1.5  # not moved by the 90 s outlier
        assert pruned["figures"]["time_to_first_token_s"]["max"] == 90.0
        assert entry["ratios"]["time_to_first_token_s"] == pytest.approx(0.5)
        assert dense["figures"]["decode_tokens_per_s"]["median"] == pytest.approx(batch * 2 / 1.0)
        assert entry["ratios"]["decode_tokens_per_s"] == pytest.approx(2.0)
        assert entry["ratios"]["prefill_tokens_per_s"] == pytest.approx(2.0)
        assert dense["memory"]["kv_cache_bytes"] == 2 * 2 * batch * 2 * (4 + 3 - 1) * 24 * 4  # layers*2*b*kv*len*hd*B
    # the narrower FFN reads fewer bytes per decode step; the unpruned lm_head weighs less in a prefill
    assert report["roofline"]["ideal_prefill_speedup"] > report["roofline"]["ideal_decode_speedup"] > 1
    # no fasp.json names the dense model: measured, since the shapes agree, with a note saying so
    assert any("no fasp.json" in note for note in report["notes"])
    assert report["pruned"]["params"] < report["dense"]["params"]


def test_unavailable_backends_are_skipped_with_a_reason(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("FASPX_VLLM_PYTHON", str(tmp_path / "no-such-python"))  # as on a machine without it
    reason = unavailable("vllm", torch.device("cpu"))
    assert reason and "no-such-python does not exist" in reason
    # the pruned model here is a plain HF directory: no onnx/ export to run in onnxruntime
    report = run_bench(tiny_dirs["dense"], tiny_dirs["pruned"], backends=("onnxruntime", "vllm"), device="cpu",
                       batches=(1,), prompt_len=4, new_tokens=2, repeats=1, progress=False, out=tmp_path / "r")
    assert report["results"] == []
    skipped = {s["backend"]: s["reason"] for s in report["skipped"]}
    assert skipped["vllm"] == reason
    assert "no ONNX export" in skipped["onnxruntime"] or "onnxruntime is not installed" in skipped["onnxruntime"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Skipped" in md and "vllm: FASPX_VLLM_PYTHON=" in md
    assert (tmp_path / "r" / "report.png").stat().st_size > 0


def _numbers(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _numbers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _numbers(value)
    elif isinstance(node, int | float) and not isinstance(node, bool):
        yield node


@pytest.fixture
def build_dirs(tmp_path, opt_tokenizer):
    """A dense tiny LLaMA, and a faspx-build-like output of it pruned 30 % (MLP): hf/, onnx/, fasp.json.
    The ONNX graph uses the fast TorchScript exporter; fasp.json says so, and the dense graph the
    benchmark exports for onnxruntime follows it."""
    import faspx
    from faspx.exporters.onnx import export_onnx

    dense = save_tiny("llama", tmp_path / "dense", opt_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    faspx.prune(model, calib, 0.3, recipe("paper", structure="mlp"), progress=False)
    build = tmp_path / "build"
    model.save_pretrained(build / "hf")
    opt_tokenizer.save_pretrained(build / "hf")
    export = export_onnx(model, opt_tokenizer, build / "onnx", None, exporter="torchscript")
    (build / "fasp.json").write_text(json.dumps({"source_model": "tiny", "exports": {"onnx": {
        k: export[k] for k in ("exporter", "opset", "dtype")}}}))
    return dense, build


def test_bench_smoke_on_tiny_models(tmp_path, build_dirs, text_file, monkeypatch):
    import matplotlib.image

    monkeypatch.setattr(faspx.benchmarks.run, "ONNX_CACHE", tmp_path / "onnx-cache")
    # vLLM has its own test (tests/test_vllm.py, head_dim 32); here its skip path is what is checked
    monkeypatch.setenv("FASPX_VLLM_PYTHON", str(tmp_path / "no-such-python"))
    dense, build = build_dirs
    out = tmp_path / "report"
    backends = "torch,onnxruntime,genai,vllm" if unavailable("genai", torch.device("cpu")) is None else \
        "torch,onnxruntime,vllm"
    args = ["bench", "--dense", str(dense), "--pruned", str(build), "--backend", backends,
            "--device", "cpu", "--batch", "1,2", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "2",
            "--eval", "--eval-dataset", str(text_file), "--eval-windows", "1", "--out", str(out), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "report.md" in result.output and "decode tokens/s" in result.output and "skipped vllm" in result.output
    report = json.loads((out / "report.json").read_text())
    process_peak = report["process_peak_rss_bytes"]  # across every reset of the high-water mark
    cells = [("torch", 1), ("torch", 2), ("onnxruntime", 1), ("onnxruntime", 2)]
    if "genai" in backends:  # onnxruntime-genai runs the same ONNX folders with its own loop
        cells += [("genai", 1), ("genai", 2)]
    assert [(e["backend"], e["batch"]) for e in report["results"]] == cells
    for entry in report["results"]:
        assert entry["order"] == ["dense", "pruned"] * 2
        for variant in entry["variants"].values():
            assert set(variant["figures"]) == {"prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s",
                                               "per_token_latency_s", "end_to_end_tokens_per_s"}
            assert {"median", "p90", "min", "max", "q1", "q3"} <= set(variant["figures"]["per_token_latency_s"])
            for value in _numbers(variant["figures"]):
                assert math.isfinite(value) and value > 0
            assert len(variant["samples"]) == 2 and all(len(s["step_s"]) == 3 for s in variant["samples"])
            m = variant["memory"]
            assert m["weight_bytes"] > 0 and m["kv_cache_bytes"] > 0
            # RSS deltas are whole bytes within this process's peak (pages freed by earlier runs may be
            # reused, so a delta can be 0; one in KiB or pages instead of bytes would break the bound)
            for key in ("rss_load_delta_bytes", "rss_run_peak_delta_bytes"):
                assert isinstance(m[key], int) and 0 <= m[key] <= process_peak, (key, m[key], process_peak)
            assert m["rss_load_run_peak_bytes"] > 0  # the weights are paged in by then
        assert entry["variants"]["pruned"]["memory"]["weight_bytes"] < entry["variants"]["dense"]["memory"][
            "weight_bytes"]
        assert all(math.isfinite(r) and r > 0 for r in entry["ratios"].values())
    assert report["skipped"] == [{"backend": "vllm", "reason": unavailable("vllm", torch.device("cpu"))}]
    assert any("exported it" in n and "torchscript" in n for n in report["notes"])  # dense had no ONNX export
    for kind in ("hf", "onnx"):
        assert 0 < report["pruned"]["disk_bytes"][kind] < report["dense"]["disk_bytes"][kind]
    assert 0 < report["pruned"]["weight_bytes"] < report["dense"]["weight_bytes"]
    assert report["roofline"]["ideal_decode_speedup"] > 1
    assert report["perplexity"][0]["dense"] > 1 and report["perplexity"][0]["pruned"] > 1
    assert report["process_peak_rss_bytes"] > 0
    env = report["environment"]
    assert env["versions"]["torch"]
    assert env["cpu"] and env["command"] and env["device"] == "cpu"
    md = (out / "report.md").read_text()
    assert "Roofline" in md and "## Skipped" in md and "pruned/dense" in md and "## Perplexity" in md
    image = matplotlib.image.imread(out / "report.png")
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


def test_report_writes_without_any_result(tmp_path):
    """A run where every backend was skipped still yields the three files (the plot says so)."""
    report = {"settings": {"dense": "d", "pruned": "p", "prompt_len": 1, "new_tokens": 2, "repeats": 1, "warmup": 0},
              "environment": {"command": "faspx bench", "cpu": "cpu", "cpu_cores_logical": 2, "torch_threads": 2,
                              "gpu": None, "device": "cpu", "time": "now", "versions": {"torch": "2"}},
              "roofline": {"dense_read_bytes": 2, "pruned_read_bytes": 1, "ideal_decode_speedup": 2.0},
              "dense": {"params": 2, "weight_bytes": 8, "dtype": "float32", "disk_bytes": {"hf": 8}},
              "pruned": {"params": 1, "weight_bytes": 4, "dtype": "float32", "disk_bytes": {"hf": 4}},
              "results": [], "skipped": [{"backend": "torch", "reason": "r"}], "notes": [],
              "memory_definitions": {}, "process_peak_rss_bytes": 1}
    paths = write_report(report, tmp_path)
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert "(no run)" in paths["md"].read_text()


def test_bench_refuses_a_pair_that_is_not_a_model_and_its_pruning(tiny_dirs, tmp_path):
    from faspx.errors import UsageError

    config = TINY_CONFIGS["llama"]()
    config.num_hidden_layers = 3
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "deeper")
    with pytest.raises(UsageError, match="num_hidden_layers 2 vs 3"):
        run_bench(tiny_dirs["dense"], tmp_path / "deeper", backends=("torch",), prompt_len=8, new_tokens=4,
                  progress=False)


def test_bench_needs_a_model_directory(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--dense", str(tmp_path), "--pruned", str(tmp_path),
                                       "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "config.json" in result.output


def test_bench_prints_its_ratios_before_writing_the_report(tiny_dirs, tmp_path, monkeypatch):
    import faspx.benchmarks.report

    class Instant:
        device, dtype, kv_bytes_per_value, weight_bytes = "cpu", "float32", 4, 1000

        def sample(self, ids, new_tokens, clock, at_end=None):
            return time_generation(lambda: sum(range(100)), lambda _s: sum(range(100)), new_tokens, clock, at_end)

    def full_disk(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(faspx.benchmarks.run, "load_runner", lambda *_a, **_k: Instant())
    monkeypatch.setattr(faspx.benchmarks.report, "write_report", full_disk)
    out = tmp_path / "report"
    args = ["bench", "--dense", str(tiny_dirs["dense"]), "--pruned", str(tiny_dirs["pruned"]), "--backend", "torch",
            "--batch", "1", "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1", "--out", str(out), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "No space left" in result.output
    assert result.output.index("pruned/dense decode tokens/s") < result.output.index("error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "pruned"]  # no report, no temporary directory


def test_prefill_ratios_are_bounded_by_the_layers_and_decode_by_the_bytes_read():
    from faspx.benchmarks.timing import noise_flags, spread

    steady = {"figures": {k: spread([10.0, 10.0]) for k in ("decode_tokens_per_s", "prefill_tokens_per_s")}}
    cell = {"backend": "torch", "batch": 1, "variants": {"dense": steady, "pruned": steady},
            "ratios": {"decode_tokens_per_s": 1.25, "prefill_tokens_per_s": 1.4, "end_to_end_tokens_per_s": 1.35}}
    assert noise_flags([cell], ideal=1.31, ideal_prefill=1.43) == []  # a prefill may beat the decode roofline
    cell["ratios"]["decode_tokens_per_s"] = 1.33
    cell["ratios"]["prefill_tokens_per_s"] = 1.5
    flags = noise_flags([cell], ideal=1.31, ideal_prefill=1.43)
    assert len(flags) == 2 and "decode_tokens_per_s 1.330x is above the weight-bytes roofline" in flags[0]
    assert "prefill_tokens_per_s 1.500x is above the decoder-layer FLOPs bound 1.430x" in flags[1]



def test_a_2ssp_checkpoint_is_benchmarked_with_its_smaller_kv_cache_at_each_prompt_length(tmp_path, opt_tokenizer):
    from faspx.exporters.hf import export_hf
    from faspx.outputs import FaspInfo
    from tests.conftest import calib, tiny_model

    dense = tiny_model("llama-deep", seed=1)
    dense.save_pretrained(tmp_path / "dense")
    pruned = tiny_model("llama-deep", seed=1)
    report = faspx.prune(pruned, calib(8, 32), 0.5, "2ssp", progress=False, device="cpu")
    export_hf(pruned, opt_tokenizer, tmp_path / "pruned", FaspInfo(source_model=str(tmp_path / "dense"),
                                                                   form=report.form))
    bench = run_bench(tmp_path / "dense", tmp_path / "pruned", backends=("torch",), device="cpu", batches=(1, 2),
                      prompt_len=(4, 12), new_tokens=3, repeats=1, warmup=0, progress=False, out=tmp_path / "r")
    kept = 8 - len(report.attention_removed)
    assert [(e["prompt_len"], e["batch"]) for e in bench["results"]] == [(4, 1), (4, 2), (12, 1), (12, 2)]
    assert bench["pruned"]["attention_layers"] == kept and bench["dense"]["attention_layers"] == 8
    assert bench["pruned"]["kv_values_per_token"] * 8 == bench["dense"]["kv_values_per_token"] * kept
    for entry in bench["results"]:
        d, p = entry["variants"]["dense"]["memory"], entry["variants"]["pruned"]["memory"]
        assert p["kv_bytes_per_token"] * 8 == d["kv_bytes_per_token"] * kept
        assert p["kv_cache_bytes"] == p["kv_bytes_per_token"] * entry["batch"] * (entry["prompt_len"] + 2)
        assert entry["ideal_decode_speedup_with_kv"] > 1
    # the cache's share of a decode step grows with the context: so does the bound with it, towards 8/kept
    bounds = [entry["ideal_decode_speedup_with_kv"] for entry in bench["results"]]
    assert bounds[3] != bounds[0]
    assert bench["notes"] == []  # fasp.json names the dense directory: the pair is known
    md = (tmp_path / "r" / "report.md").read_text()
    assert "batch 2, prompt 12" in md and "KV cache values per token" in md


def test_quantized_exports_are_benchmarked_against_the_dense_float32_graph(tmp_path, build_dirs, text_file,
                                                                          monkeypatch):
    """The build's onnx-int8 and onnx-int4 run as further onnxruntime variants, interleaved with dense
    and pruned; their bytes read per step follow the block layout; their perplexity is on the same
    windows; named precisions must exist and need an ONNX backend."""
    import onnx

    from faspx.benchmarks.memory import onnx_read_bytes
    from faspx.errors import UsageError
    from faspx.exporters.quantize import (
        eight_bit_matmuls,
        expected_weight_bytes,
        gemms_to_matmuls,
        quantize_onnx,
        untie_transposed_weights,
    )

    monkeypatch.setattr(faspx.benchmarks.run, "ONNX_CACHE", tmp_path / "onnx-cache")
    dense, build = build_dirs
    with pytest.raises(UsageError, match="no onnx-int4"):
        run_bench(dense, build, backends=("onnxruntime",), precisions=("int4",), prompt_len=8, new_tokens=2,
                  progress=False)
    for precision in ("int8", "int4"):
        (build / f"onnx-{precision}").mkdir()
        quantize_onnx(build / "onnx", build / f"onnx-{precision}", precision)
    with pytest.raises(UsageError, match="add --backend onnxruntime"):
        run_bench(dense, build, backends=("torch",), precisions=("int4",), prompt_len=8, new_tokens=2,
                  progress=False)
    report = run_bench(dense, build, backends=("onnxruntime",), device="cpu", batches=(1,), prompt_len=8,
                       new_tokens=4, repeats=2, progress=False, eval=True, eval_datasets=(str(text_file),),
                       max_windows=1, out=tmp_path / "r")
    names = ["dense", "pruned", "pruned-int8", "pruned-int4"]
    (entry,) = report["results"]
    assert list(entry["variants"]) == names and entry["order"] == names * 2
    assert set(entry["ratios_vs_dense"]) == set(names[1:])
    read = [report[n]["onnx_read_bytes"] for n in names]
    assert read[0] > read[1] > read[2] > read[3]
    # int4: the untied float32 graph's weights in blocks of 32 (16 bytes + a float32 scale; 32 bytes for
    # the mixed layout's 8-bit ones), minus the embedding table, which a step reads one row of
    graph = onnx.load(str(build / "onnx" / "model.onnx"))
    untie_transposed_weights(graph)
    gemms_to_matmuls(graph)
    config = json.loads((build / "hf" / "config.json").read_text())
    table = config["vocab_size"] * math.ceil(config["hidden_size"] / 32) * 20
    eight = tuple(eight_bit_matmuls(graph, "mixed"))
    assert report["pruned-int4"]["onnx_read_bytes"] == expected_weight_bytes(graph, 4, 32, True, eight) - table
    assert report["pruned-int4"]["onnx_read_bytes"] == onnx_read_bytes(build / "onnx-int4")
    bounds = entry["ideal_vs_dense"]
    assert 1 < bounds["pruned"]["decode"] < bounds["pruned-int8"]["decode"] < bounds["pruned-int4"]["decode"]
    assert report["pruned-int4"]["quantization"]["precision"] == "int4"
    ppl = report["perplexity"][0]
    assert all(ppl[n] > 1 for n in names)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Precisions (ONNX graphs)" in md and "pruned-int4/dense" in md and "| pruned-int8 | int8, block 32" in md
    only = run_bench(dense, build, backends=("onnxruntime",), device="cpu", batches=(1,), prompt_len=8, new_tokens=2,
                     repeats=1, precisions=("int4",), progress=False)
    assert list(only["results"][0]["variants"]) == ["dense", "pruned", "pruned-int4"]


def test_a_builder_export_makes_the_bench_export_the_dense_model_with_the_builder_too(tmp_path):
    """`faspx export` writes no top-level fasp.json: the graph's config.json says who wrote it, so the
    two graphs compared differ by the pruning only, not by the exporter."""
    from faspx.benchmarks.inputs import onnx_settings

    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "config.json").write_text(json.dumps({"dtype": "float32", "faspx_exporter": "builder"}))
    assert onnx_settings(tmp_path, tmp_path / "onnx")["exporter"] == "builder"
    (tmp_path / "onnx" / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert onnx_settings(tmp_path, tmp_path / "onnx")["exporter"] == "auto"
