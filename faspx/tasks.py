"""The seven zero-shot tasks pruning papers report, as lm-evaluation-harness task configs over local files.

The hub is often out of reach (always, on this project's machines), so faspx ships the tasks' configs
and reads their data from a directory (``../shared/data/zeroshot/``: see its README). Prompts, targets
and metrics are lm-eval 0.4's own (``lm_eval/tasks/{arc,boolq,hellaswag,...}``); each local file is
turned into the fields those prompts read. Where a file cannot give lm-eval's exact prompt,
``DIFFERENCES`` says how it differs, and the report repeats it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from faspx.errors import UsageError

TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
FILES = {"arc_easy": ("arc_easy.jsonl",), "arc_challenge": ("arc_challenge.jsonl",),
         "openbookqa": ("openbook_qa.jsonl",), "boolq": ("boolq.jsonl",), "winogrande": ("winogrande.jsonl",),
         "piqa": ("piqa_valid.jsonl", "piqa_valid-labels.lst"), "hellaswag": ("hellaswag_val.txt",)}
# lm-eval's metrics per task; the headline one (papers' convention: acc_norm where a task has it) first.
METRICS = {"boolq": ("acc",), "winogrande": ("acc",), "piqa": ("acc_norm", "acc"), "hellaswag": ("acc_norm", "acc"),
           "arc_easy": ("acc_norm", "acc"), "arc_challenge": ("acc_norm", "acc"), "openbookqa": ("acc_norm", "acc")}
DIFFERENCES = {
    "boolq": "passage without SuperGLUE's 'Title -- ' prefix (the local file has no title)",
    "hellaswag": "context is the dataset's raw ctx (lm-eval capitalises the first letter of ctx_b; the local "
                 "file does not keep the ctx_a/ctx_b split)",
}
HUB = "hub"  # --tasks-dir hub: lm-eval's own task definitions, data from the Hugging Face hub
TASK_VERSION = 1  # faspx's configs; part of the dense-score cache key


def parse_tasks(value: str) -> tuple[str, ...]:
    """``--tasks``: comma-separated names or ``all``; a name faspx does not ship lists those it does.

    Example:
        >>> parse_tasks("arc_easy, winogrande")
        ('arc_easy', 'winogrande')
        >>> parse_tasks("all") == TASKS
        True
    """
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    if names == ("all",):
        return TASKS
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise UsageError(f"--tasks: unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown) or '(none)'}; "
                         f"available: {', '.join(TASKS)} or all")
    return names


def default_tasks_dir() -> Path:
    """Where the task files are looked for: $FASPX_ZEROSHOT_DIR, else ../shared/data/zeroshot from the
    working directory, else beside the faspx checkout."""
    if os.environ.get("FASPX_ZEROSHOT_DIR"):
        return Path(os.environ["FASPX_ZEROSHOT_DIR"]).expanduser()
    here = Path("../shared/data/zeroshot")
    beside = Path(__file__).resolve().parents[2] / "shared" / "data" / "zeroshot"
    return here if here.is_dir() or not beside.is_dir() else beside


def check_tasks_dir(tasks: tuple[str, ...], directory: str | Path | None) -> Path | str:
    """The directory holding every file ``tasks`` read (or ``hub``); UsageError naming what is missing
    and where it was expected.

    Example:
        >>> check_tasks_dir(("arc_easy",), "/nowhere")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        faspx.errors.UsageError: zero-shot task files not found: /nowhere/arc_easy.jsonl (arc_easy). The seven ...
    """
    if directory == HUB:
        from faspx.models import hub_offline

        if hub_offline():
            raise UsageError("--tasks-dir hub downloads lm-eval's task data from the Hugging Face hub, which is "
                             "offline (HF_HUB_OFFLINE is set): give --tasks-dir DIR with the local files")
        return HUB
    root = Path(directory).expanduser() if directory else default_tasks_dir()
    missing = [f"{root / name} ({task})" for task in tasks for name in FILES[task] if not (root / name).is_file()]
    if missing:
        raise UsageError(f"zero-shot task files not found: {', '.join(missing)}. The seven sets are expected in "
                         "../shared/data/zeroshot/ (its README says what each file is) or in --tasks-dir DIR (or "
                         "$FASPX_ZEROSHOT_DIR); --tasks-dir hub uses lm-eval's own tasks from the Hugging Face hub")
    return root


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UsageError(f"{path} line {number} is not JSON: {err.msg}") from None
    return rows


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text cleaning (WikiHow's bracket tags).

    Example:
        >>> hellaswag_preprocess(" Make tea [title] Boil  water [step] now ")
        'Make tea. Boil water now'
    """
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_docs(task: str, root: Path) -> list[dict]:
    """The task's rows as the fields its prompt reads: ``query``, ``choices``, ``gold`` (WinoGrande:
    ``options`` (the two contexts), ``continuation``, ``gold``)."""
    path = root / FILES[task][0]
    if task in ("arc_easy", "arc_challenge"):  # the query already opens with "Question: "
        return [{"query": r["query"] + "\nAnswer:", "choices": r["choices"], "gold": r["gold"]} for r in _jsonl(path)]
    if task == "openbookqa":
        return [{"query": r["query"], "choices": r["choices"], "gold": r["gold"]} for r in _jsonl(path)]
    if task == "boolq":  # "Passage: {p}\nQuestion: {q}?" -> lm-eval's "{p}\nQuestion: {q}?\nAnswer:"
        docs = []
        for r in _jsonl(path):
            passage, _, question = r["query"].removeprefix("Passage: ").rpartition("\nQuestion: ")
            question = question if question.endswith("?") else question + "?"
            docs.append({"query": f"{passage}\nQuestion: {question}\nAnswer:", "choices": ["no", "yes"],
                         "gold": r["gold"]})
        return docs
    if task == "piqa":
        labels = [int(v) for v in (root / FILES[task][1]).read_text().split()]
        rows = _jsonl(path)
        if len(labels) != len(rows):
            raise UsageError(f"{root / FILES[task][1]} has {len(labels)} labels for {len(rows)} rows in {path}")
        return [{"query": f"Question: {r['goal']}\nAnswer:", "choices": [r["sol1"], r["sol2"]], "gold": g}
                for r, g in zip(rows, labels, strict=True)]
    if task == "hellaswag":  # six lines a row: "label: ctx", gold, four endings
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) % 6:
            raise UsageError(f"{path}: {len(lines)} lines, not six a row")
        return [{"query": hellaswag_preprocess(lines[i]), "gold": int(lines[i + 1]),
                 "choices": [hellaswag_preprocess(e) for e in lines[i + 2:i + 6]]} for i in range(0, len(lines), 6)]
    if task == "winogrande":
        return [{"options": r["context_options"], "continuation": r["continuation"].strip(), "gold": r["gold"]}
                for r in _jsonl(path)]
    raise UsageError(f"unknown task {task!r}")


def task_config(task: str, root: Path) -> dict:
    """The lm-eval TaskConfig of ``task`` over the local files in ``root`` (zero-shot, no few-shot split).

    Example:
        >>> task_config("arc_easy", Path("."))["metric_list"][0]["metric"]
        'acc'
    """
    def dataset(**_):
        import datasets

        return {"test": datasets.Dataset.from_list(load_docs(task, root))}

    metrics = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in sorted(METRICS[task])]
    config = {"task": task, "output_type": "multiple_choice", "custom_dataset": dataset, "test_split": "test",
              "metric_list": metrics, "metadata": {"version": TASK_VERSION, "faspx_local": str(root)}}
    if task == "winogrande":  # lm-eval's partial scoring: the same continuation after each context
        return {**config, "doc_to_text": _gold, "doc_to_choice": _options, "doc_to_target": _continuation}
    return {**config, "doc_to_text": _query, "doc_to_choice": _choices, "doc_to_target": _gold}


# lm-eval calls these on each row (module-level: picklable, so its request cache can hash them)
def _query(doc: dict) -> str:
    return doc["query"]


def _choices(doc: dict) -> list[str]:
    return list(doc["choices"])


def _gold(doc: dict) -> int:
    return int(doc["gold"])


def _options(doc: dict) -> list[str]:
    return list(doc["options"])


def _continuation(doc: dict) -> str:
    return doc["continuation"]
