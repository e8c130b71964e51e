"""faspx's zero-shot task configs: the local files read into lm-eval's prompts, row for row."""

from __future__ import annotations

import json

import pytest

from faspx.errors import UsageError
from faspx.tasks import FILES, TASKS, check_tasks_dir, load_docs, parse_tasks, task_config
from tests.conftest import SHARED

ROOT = SHARED / "data" / "zeroshot"
ROWS = {"arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500, "boolq": 3270, "winogrande": 1267,
        "piqa": 1838, "hellaswag": 10042}  # the official splits' sizes (the data README)


@pytest.fixture(scope="module")
def root():
    if not ROOT.is_dir():
        pytest.skip(f"{ROOT} is absent: the zero-shot task files live beside the repository")
    return ROOT


def test_task_names_parse_and_a_wrong_one_lists_the_available():
    assert parse_tasks("all") == TASKS and parse_tasks("piqa,piqa, boolq") == ("piqa", "boolq")
    with pytest.raises(UsageError, match="unknown task arc; available: boolq, piqa, hellaswag, .* or all"):
        parse_tasks("arc,piqa")
    with pytest.raises(UsageError, match="available"):
        parse_tasks(",")


def test_a_missing_directory_or_file_says_where_the_files_are_expected(tmp_path):
    with pytest.raises(UsageError, match=r"piqa_valid-labels.lst \(piqa\).*expected in ../shared/data/zeroshot/"):
        check_tasks_dir(("piqa",), tmp_path)
    (tmp_path / "piqa_valid.jsonl").write_text("")
    (tmp_path / "piqa_valid-labels.lst").write_text("")
    assert check_tasks_dir(("piqa",), tmp_path) == tmp_path


def test_the_hub_is_refused_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="offline"):
        check_tasks_dir(TASKS, "hub")


@pytest.mark.parametrize("task", TASKS)
def test_every_row_is_read_with_lm_evals_prompt_form(task, root):
    docs = load_docs(task, root)
    assert len(docs) == ROWS[task]
    if task == "winogrande":
        assert all(len(d["options"]) == 2 and d["gold"] in (0, 1) and d["continuation"] for d in docs)
        return
    assert all(0 <= d["gold"] < len(d["choices"]) for d in docs)
    first = json.loads((root / FILES[task][0]).open().readline()) if task != "hellaswag" else None
    if task in ("arc_easy", "arc_challenge"):  # "Question: {question}\nAnswer:"
        assert docs[0]["query"] == first["query"] + "\nAnswer:" and docs[0]["query"].startswith("Question: ")
    if task == "boolq":  # "{passage}\nQuestion: {question}?\nAnswer:", choices no / yes
        assert all(d["query"].endswith("?\nAnswer:") and not d["query"].startswith("Passage: ") for d in docs)
        assert docs[0]["query"].count("\nQuestion: ") == 1 and docs[0]["choices"] == ["no", "yes"]
    if task == "piqa":  # "Question: {goal}\nAnswer:", [sol1, sol2], the labels file's gold
        assert docs[0]["query"] == f"Question: {first['goal']}\nAnswer:"
        assert docs[0]["choices"] == [first["sol1"], first["sol2"]] and docs[0]["gold"] == 0
    if task == "hellaswag":  # "activity_label: ctx", no WikiHow tags left
        assert docs[0]["query"].startswith("Roof shingle removal: A man is sitting on a roof.")
        assert docs[0]["gold"] == 3 and not any("[" in d["query"] for d in docs)


@pytest.mark.parametrize("task", ["arc_easy", "winogrande"])
def test_lm_eval_builds_the_requests_lm_eval_would(task, root):
    """Through lm-eval itself: ARC scores " {choice}" after the question; WinoGrande scores the same
    continuation after each context option (its partial scoring), gold from the row."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install faspx[eval])")
    from lm_eval.api.task import ConfigurableTask

    task_obj = ConfigurableTask(config=task_config(task, root))
    doc = task_obj.test_docs()[0]
    requests = task_obj.construct_requests(doc, task_obj.fewshot_context(doc, num_fewshot=0))
    pairs = [r.args for r in requests]
    if task == "arc_easy":
        assert pairs[0] == (doc["query"], " " + doc["choices"][0]) and len(pairs) == 4
    else:
        assert pairs == [(option, " " + doc["continuation"]) for option in doc["options"]]
        assert doc["continuation"] == "always got the easier cases." and doc["gold"] == 1
