"""Every command with every cheap bad input: exit 2, one line naming the problem, in under 5 s, and
no model loaded (the loaders are patched to fail loudly), nothing written."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from click.testing import CliRunner

from faspx.cli import main
from tests.conftest import save_tiny

LOADED = "MODEL WAS LOADED"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny dense LLaMA, a stand-in pruned build of it, an OPT, and bad input files."""
    from transformers import AutoTokenizer

    from tests.conftest import SHARED

    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the shared test data lives beside the repository")
    root = tmp_path_factory.mktemp("preflight")
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "opt")
    dense = save_tiny("llama", root / "dense", tokenizer)
    save_tiny("opt", root / "opt", tokenizer)
    # a build output's layout: hf/ and fasp.json naming the dense model (bench reads only configs)
    shutil.copytree(dense, root / "pruned" / "hf")
    (root / "pruned" / "fasp.json").write_text(json.dumps({"source_model": str(dense), "form": "stock"}))
    (root / "text.txt").write_text("Some text. " * 2000)
    (root / "empty.txt").write_text("  \n")
    (root / "garbage.txt").write_bytes(b"good start \xff\xfe\x80 bad bytes")
    (root / "rows.jsonl").write_text('{"body": "no text field"}\n')
    (root / "broken.jsonl").write_text('{"text": "fine"}\n{not json\n')
    (root / "unknown.csv").write_text("text\nhello\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["no text column"]}), root / "notext.parquet")
    (root / "a_file").write_text("not a directory")
    shutil.copytree(dense, root / "badconfig")
    (root / "badconfig" / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    shutil.copytree(dense, root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "noconfig").mkdir()
    (root / "existing").mkdir()
    return root


def _cases():
    prune = ["--model", "{dense}", "--sparsity", "0.3", "--calib", "{text}", "--nsamples", "2", "--seqlen", "32",
             "--recipe", "paper"]
    core = [  # (what, arguments replacing or extending the prune ones, a fragment of the message)
        ("nsamples 0", ["--nsamples", "0"], "--nsamples"),
        ("nsamples -1", ["--nsamples", "-1"], "--nsamples"),
        ("seqlen 1", ["--seqlen", "1"], "--seqlen"),
        ("sparsity 1.5", ["--sparsity", "1.5"], "sparsity"),
        ("calib missing", ["--calib", "{root}/missing.txt"], "missing.txt"),
        ("calib empty", ["--calib", "{root}/empty.txt"], "holds no text"),
        ("calib not UTF-8", ["--calib", "{root}/garbage.txt"], "not UTF-8"),
        ("calib jsonl without text", ["--calib", "{root}/rows.jsonl"], "rows.jsonl line 1: jsonl rows need"),
        ("calib jsonl broken", ["--calib", "{root}/broken.jsonl"], "broken.jsonl line 2 is not JSON"),
        ("calib parquet without text", ["--calib", "{root}/notext.parquet"], "'text' column"),
        ("calib unknown suffix", ["--calib", "{root}/unknown.csv"], "unsupported"),
        ("calib hub offline", ["--calib", "wikitext2"], "offline"),
        ("model missing", ["--model", "{root}/nowhere"], "does not exist"),
        ("model without config", ["--model", "{root}/noconfig"], "config.json"),
        ("corrupt config.json", ["--model", "{root}/badconfig"], "badconfig/config.json"),
        ("truncated safetensors", ["--model", "{root}/truncated"], "truncated/model.safetensors"),
        ("device gpu", ["--device", "gpu"], "--device"),
        ("device cuda without a GPU", ["--device", "cuda:1"], "--device"),
        ("dtype int8", ["--dtype", "int8"], "int8"),
        ("unknown recipe", ["--recipe", "nosuch"], "nosuch"),
        ("distill above nsamples", ["--recipe", "quality"], "--distill 16"),
        ("out is the working directory", ["--out", ".", "--force"], "working directory"),
        ("out under a file", ["--out", "{root}/a_file/x"], "a_file"),
        ("out exists", ["--out", "{root}/existing"], "--force"),
    ]
    for what, extra, message in core:
        out = [] if "--out" in extra else ["--out", "{root}/new"]
        for command in ("prune", "build"):
            yield f"{command}: {what}", [command, *prune, *extra, *out], message
    build = [
        ("eval dataset missing", ["--eval", "--eval-dataset", "{root}/missing.txt"], "missing.txt"),
        ("eval dataset offline", ["--eval"], "offline"),
        ("eval windows 0", ["--eval", "--eval-dataset", "{text}", "--eval-windows", "0"], "--eval-windows"),
        ("atol 0", ["--atol", "0"], "--atol"),
        ("per-layer widths to onnx", ["--ffn-widths", "per-layer"], "per-layer"),
    ]
    for what, extra, message in build:
        yield f"build: {what}", ["build", *prune, *extra, "--out", "{root}/new"], message
    export = ["export", "--model", "{dense}", "--out", "{root}/new"]
    for what, extra, message in [
        ("opset 5", ["--target", "onnx", "--opset", "5"], "opset 14"),
        ("dynamo below 18", ["--target", "onnx", "--opset", "14", "--exporter", "dynamo"], "torchscript"),
        ("atol -1", ["--atol", "-1"], "--atol"),
        ("model missing", ["--model", "{root}/nowhere"], "does not exist"),
        ("truncated safetensors", ["--model", "{root}/truncated"], "model.safetensors"),
        ("corrupt config.json", ["--model", "{root}/badconfig"], "config.json"),
        ("out exists", ["--out", "{root}/existing"], "--force"),
    ]:
        yield f"export: {what}", [*export, *extra], message
    evaluate = ["eval", "--model", "{dense}", "--dataset", "{text}"]
    for what, extra, message in [
        ("seqlen 1", ["--seqlen", "1"], "--seqlen"),
        ("seqlen 0", ["--seqlen", "0"], "--seqlen"),
        ("max windows 0", ["--max-windows", "0"], "--max-windows"),
        ("max windows -1", ["--max-windows", "-1"], "--max-windows"),
        ("dataset missing", ["--dataset", "{root}/missing.txt"], "missing.txt"),
        ("dataset offline", ["--dataset", "wikitext2"], "offline"),
        ("dataset not UTF-8", ["--dataset", "{root}/garbage.txt"], "not UTF-8"),
        ("json in a missing directory", ["--json", "{root}/nowhere/x.json"], "does not exist"),
        ("json is a directory", ["--json", "{root}/existing"], "directory"),
        ("device gpu", ["--device", "gpu"], "--device"),
        ("corrupt config.json", ["--model", "{root}/badconfig"], "config.json"),
        ("truncated safetensors", ["--model", "{root}/truncated"], "model.safetensors"),
    ]:
        yield f"eval: {what}", [*evaluate, *extra], message
    bench = ["bench", "--dense", "{dense}", "--pruned", "{root}/pruned", "--backend", "torch", "--prompt-len", "8",
             "--new-tokens", "4", "--out", "{root}/benchout"]
    for what, extra, message in [
        ("unrelated dense model", ["--dense", "{root}/opt"], "not a pruning"),
        ("out under a file", ["--out", "{root}/a_file/x"], "a_file"),
        ("out exists", ["--out", "{root}/existing"], "--force"),
        ("eval dataset missing", ["--eval", "--eval-dataset", "{root}/missing.txt"], "missing.txt"),
        ("eval windows 0", ["--eval", "--eval-dataset", "{text}", "--eval-windows", "0"], "--eval-windows"),
        ("batch 0", ["--batch", "0"], "batch"),
        ("device gpu", ["--device", "gpu"], "--device"),
        ("truncated safetensors", ["--dense", "{root}/truncated"], "model.safetensors"),
        ("unknown backend", ["--backend", "tensorrt"], "tensorrt"),
    ]:
        yield f"bench: {what}", [*bench, *extra], message
    generate = ["generate", "--model", "{dense}", "--prompt", "Hello"]
    for what, extra, message in [
        ("empty prompt", ["--prompt", ""], "empty"),
        ("device gpu", ["--device", "gpu"], "--device"),
        ("device cuda:1 without a GPU", ["--device", "cuda:1"], "cuda:1"),
        ("model missing", ["--model", "{root}/nowhere"], "does not exist"),
    ]:
        yield f"generate: {what}", [*generate, *extra], message


CASES = list(_cases())


@pytest.mark.parametrize("args, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_fast_with_exit_2_and_loads_no_model(dirs, monkeypatch, args, message):
    import onnxruntime
    import transformers

    def loaded(*_args, **_kwargs):
        raise AssertionError(LOADED)

    for cls in (transformers.AutoModelForCausalLM, transformers.PreTrainedModel):
        monkeypatch.setattr(cls, "from_pretrained", loaded)
    monkeypatch.setattr(onnxruntime, "InferenceSession", loaded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    values = {"root": str(dirs), "dense": str(dirs / "dense"), "text": str(dirs / "text.txt")}
    args = [a.format(**values) for a in args]
    before = sorted(p.name for p in dirs.iterdir())
    start = time.perf_counter()
    result = CliRunner().invoke(main, args)
    seconds = time.perf_counter() - start
    assert LOADED not in result.output, result.output
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert seconds < 5, f"{seconds:.1f}s"
    assert sorted(p.name for p in dirs.iterdir()) == before  # nothing written, no temporary directory left
