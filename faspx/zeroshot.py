"""Zero-shot accuracy through lm-evaluation-harness: a model in PyTorch (lm-eval's HFLM) or an ONNX
export (``OnnxLM``: the log-likelihood requests run in onnxruntime), on faspx's task configs
(``faspx.tasks``) or lm-eval's own (``--tasks-dir hub``); dense scores cached per model and task set.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import time
from pathlib import Path

import numpy as np

from faspx.errors import UsageError
from faspx.tasks import DIFFERENCES, HUB, METRICS, TASK_VERSION, task_config

log = logging.getLogger("faspx")
CACHE = Path("~/.cache/faspx/zeroshot").expanduser()


def require_lm_eval():
    """lm_eval, or a UsageError that says how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise UsageError("zero-shot tasks need lm-evaluation-harness: pip install 'faspx[eval]'") from None
    return lm_eval


def _template_lm():
    require_lm_eval()
    from lm_eval.api.model import TemplateLM

    return TemplateLM


def onnx_lm(onnx_dir: str | Path, batch_size: int = 8, device: str = "auto"):
    """An lm-eval LM over faspx's ONNX export: log-likelihoods from one onnxruntime run per batch of
    (context + continuation) rows, right-padded; generation tasks are not served.

    Example:
        >>> lm = onnx_lm("out/onnx")  # doctest: +SKIP
        >>> lm.loglikelihood(requests)  # doctest: +SKIP
    """
    from faspx.exporters.ort_runtime import OnnxDecoder

    decoder = OnnxDecoder(onnx_dir, device=device)
    config = json.loads((Path(onnx_dir) / "config.json").read_text())

    class OnnxLM(_template_lm()):
        def __init__(self):
            super().__init__()
            self.decoder, self.tokenizer, self.batch_size = decoder, decoder.tokenizer, batch_size
            self.max_length = int(config.get("max_position_embeddings") or 2048)

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
            kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            return self.tokenizer.encode(string, **kwargs)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_) -> list[tuple[float, bool]]:
            from tqdm.auto import tqdm

            # the model sees context + continuation minus its last token, left-truncated to max_length
            rows = [((ctx + cont)[-(self.max_length + 1):][:-1], cont) for _, ctx, cont in requests]
            order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths batch together
            answers: list[tuple[float, bool] | None] = [None] * len(rows)
            for start in tqdm(range(0, len(order), self.batch_size), desc="onnxruntime loglikelihood",
                              disable=disable_tqdm):
                batch = order[start:start + self.batch_size]
                width = max(len(rows[i][0]) for i in batch)
                ids = np.zeros((len(batch), width), dtype=np.int64)
                mask = np.zeros_like(ids)
                for b, i in enumerate(batch):
                    ids[b, :len(rows[i][0])], mask[b, :len(rows[i][0])] = rows[i][0], 1
                logits = self.decoder.prefill(ids, mask)[0].astype(np.float32)
                for b, i in enumerate(batch):
                    inp, cont = rows[i]
                    scores = logits[b, len(inp) - len(cont):len(inp)]
                    logprobs = scores - np.logaddexp.reduce(scores, axis=-1, keepdims=True)
                    answer = (float(logprobs[np.arange(len(cont)), cont].sum()),
                              bool((scores.argmax(-1) == np.asarray(cont)).all()))
                    answers[i] = answer
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            return answers

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise UsageError("faspx's ONNX LM scores multiple-choice tasks; for perplexity run faspx eval --dataset")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise UsageError("faspx's ONNX LM scores multiple-choice tasks; generation tasks are not served")

    return OnnxLM()


def hf_lm(model, tokenizer, batch_size: int = 8):
    """lm-eval's own HFLM over an in-memory transformers model (stock or faspx's nemotron-nas)."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def build_tasks(tasks: tuple[str, ...], root: Path | str) -> tuple[list, object]:
    """The task objects (or names, for the hub) and the TaskManager lm-eval evaluates them with."""
    require_lm_eval()
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager

    if root == HUB:
        return list(tasks), TaskManager()
    return [ConfigurableTask(config=task_config(t, Path(root))) for t in tasks], TaskManager(include_defaults=False)


def evaluate(lm, tasks: tuple[str, ...], root: Path | str, limit: int | None = None,
             samples: bool = False, progress: bool = True) -> dict:
    """Run lm-eval on ``tasks``: per task its metrics (value and stderr) and rows scored; with
    ``samples`` also lm-eval's per-row records (the requests and their log-likelihoods). lm-eval's own
    log lines show with -v only; its progress bars unless ``progress`` is off."""
    lm_eval = require_lm_eval()
    task_objects, manager = build_tasks(tasks, root)
    start = time.perf_counter()
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet:  # lm-eval's tqdm bars take no switch: without progress they write into a discarded buffer
        out = lm_eval.simple_evaluate(model=lm, tasks=task_objects, task_manager=manager, limit=limit,
                                      num_fewshot=0, log_samples=samples, bootstrap_iters=0, random_seed=0,
                                      numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    result = {"lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "?", "limit": limit,
              "tasks_dir": str(root), "seconds": time.perf_counter() - start, "tasks": {}}
    for task in tasks:
        metrics = out["results"][task]
        n = out.get("n-samples", {}).get(task, {})
        entry = {"rows": n.get("effective"), "rows_in_set": n.get("original"), "metrics": {}}
        for metric in METRICS[task]:
            value = metrics[f"{metric},none"]
            entry["metrics"][metric] = {"value": float(value), "stderr": _stderr(len_rows=n.get("effective"),
                                                                                 p=float(value))}
        if root != HUB and task in DIFFERENCES:
            entry["differs_from_lm_eval"] = DIFFERENCES[task]
        result["tasks"][task] = entry
    result["mean"] = mean_score(result)
    if samples:
        result["samples"] = out["samples"]
    return result


def score_model(model_name: str, tasks: tuple[str, ...], root: Path | str, limit: int | None = None,
                batch_size: int = 8, device: str = "auto", dtype: str = "float32", use_cache: bool = False,
                progress: bool = True) -> dict:
    """Zero-shot scores of a model directory or hub id: an ONNX export in onnxruntime, an HF directory
    (stock or nemotron-nas) in PyTorch on ``device`` in ``dtype``. ``use_cache`` reads and keeps the
    result in ~/.cache/faspx/zeroshot (a dense model scored once per task set).

    Example:
        >>> score_model("~/.cache/faspx/smollm2-135m", ("arc_easy",), "../shared/data/zeroshot")  # doctest: +SKIP
    """
    from faspx.models import resolve
    from faspx.prune import resolve_device, resolve_dtype

    source, _ = resolve(model_name)
    onnx = (Path(source) / "model.onnx").exists()
    dev = resolve_device(device)
    run_dtype = "float32" if onnx else str(resolve_dtype(dtype, dev)).removeprefix("torch.")
    key = cache_key(source, tasks, root, limit, run_dtype, batch_size) if use_cache else None
    if key and (hit := cached(key)) is not None:
        log.info("zero-shot scores of %s from the cache (%s)", model_name, CACHE / f"{key}.json")
        return {**hit, "cached": True}
    if onnx:
        lm = onnx_lm(source, batch_size, device=str(dev))
    else:
        from faspx.pipeline import load_any

        model, tokenizer = load_any(model_name, dtype=resolve_dtype(dtype, dev))
        lm = hf_lm(model.to(dev), tokenizer, batch_size)
    log.info("zero-shot tasks %s on %s (%s)", ",".join(tasks), model_name, "onnxruntime" if onnx else run_dtype)
    result = {"model": model_name, "runtime": "onnxruntime" if onnx else "torch", "dtype": run_dtype,
              **evaluate(lm, tasks, root, limit, progress=progress)}
    if key:
        store(key, result)
    return result


def _stderr(len_rows: int | None, p: float) -> float | None:
    """The standard error of a mean of 0/1 scores (lm-eval's own, with bootstrapping off)."""
    if not len_rows or len_rows < 2:
        return None
    return float(np.sqrt(p * (1 - p) / (len_rows - 1)))


def mean_score(result: dict) -> float:
    """The mean over tasks of each task's headline metric (acc_norm where it has one, else acc: the
    papers' convention)."""
    return float(np.mean([t["metrics"][METRICS[name][0]]["value"] for name, t in result["tasks"].items()]))


def cache_key(model_source: str | Path, tasks: tuple[str, ...], root: Path | str, limit: int | None, dtype: str,
              batch_size: int) -> str:
    """What a dense score depends on: the model's files (names, sizes, times), the task files' bytes,
    the tasks, the limit, the dtype, lm-eval's and faspx's task versions."""
    lm_eval = require_lm_eval()
    parts = [str(TASK_VERSION), getattr(lm_eval, "__version__", "?"), ",".join(tasks), str(limit), dtype,
             str(batch_size), str(root)]
    source = Path(model_source)
    if source.is_dir():
        parts += [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(source.iterdir())
                  if p.is_file()]
    else:
        parts.append(str(model_source))
    if root != HUB:
        from faspx.tasks import FILES

        parts += [f"{n}:{(Path(root) / n).stat().st_size}:{(Path(root) / n).stat().st_mtime_ns}"
                  for t in tasks for n in FILES[t]]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cached(key: str) -> dict | None:
    """A stored dense result, or None."""
    path = CACHE / f"{key}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def store(key: str, result: dict) -> None:
    """Keep a dense result for the next build of the same model and task set (atomic replace)."""
    from faspx.outputs import write_json

    CACHE.mkdir(parents=True, exist_ok=True)
    write_json(CACHE / f"{key}.json", {k: v for k, v in result.items() if k != "samples"})


def table(dense: dict | None, pruned: dict) -> list[dict]:
    """Rows task, metric, dense, pruned, delta (pruned - dense), and a final mean row.

    Example:
        >>> r = {"tasks": {"boolq": {"metrics": {"acc": {"value": 0.6}}}}, "mean": 0.6}
        >>> round(table(r, {"tasks": {"boolq": {"metrics": {"acc": {"value": 0.5}}}}, "mean": 0.5})[-1]["delta"], 4)
        -0.1
    """
    rows = []
    for task, entry in pruned["tasks"].items():
        for metric, score in entry["metrics"].items():
            d = dense["tasks"][task]["metrics"][metric]["value"] if dense else None
            rows.append({"task": task, "metric": metric, "dense": d, "pruned": score["value"],
                         "delta": None if d is None else score["value"] - d})
    d = dense["mean"] if dense else None
    rows.append({"task": "mean", "metric": "acc_norm, else acc", "dense": d, "pruned": pruned["mean"],
                 "delta": None if d is None else pruned["mean"] - d})
    return rows


def markdown(rows: list[dict], limit: int | None, notes: dict[str, str] | None = None) -> str:
    """The table as Markdown, with the limit and each task's difference from lm-eval's prompt."""
    def cell(value: float | None, signed: bool = False) -> str:
        return "-" if value is None else f"{value:+.4f}" if signed else f"{value:.4f}"

    lines = [f"Zero-shot accuracy ({'all rows' if limit is None else f'first {limit} rows of each task'}, "
             "lm-evaluation-harness)", "", "| task | metric | dense | pruned | delta |", "|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['metric']} | {cell(r['dense'])} | {cell(r['pruned'])} | {cell(r['delta'], True)} |"
              for r in rows]
    lines += [f"\n{task}: {why}" for task, why in (notes or {}).items()]
    return "\n".join(lines) + "\n"
