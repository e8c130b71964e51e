import json

import pytest
import torch

from faspx.data import calibration_ids, eval_ids, load_texts
from faspx.errors import FaspxError, UsageError


def test_local_formats_give_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["first doc", "second doc"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    assert load_texts(str(tmp_path / "a.jsonl")) == docs
    assert load_texts(str(tmp_path / "a.parquet")) == docs


def test_parquet_without_text_column_is_a_usage_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(UsageError, match="text"):
        load_texts(str(tmp_path / "b.parquet"))


def test_missing_file_and_hub_names_offline(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="neither"):
        load_texts(str(tmp_path / "nope.txt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FaspxError, match="offline"):
        load_texts("wikitext2")


def test_calibration_windows_are_seeded_and_shaped(opt_tokenizer, text_file):
    a = calibration_ids(opt_tokenizer, str(text_file), nsamples=4, seqlen=64, seed=0)
    b = calibration_ids(opt_tokenizer, str(text_file), nsamples=4, seqlen=64, seed=0)
    assert a.shape == (4, 64) and a.dtype == torch.long and torch.equal(a, b)


def test_calibration_text_too_short(opt_tokenizer, tmp_path):
    (tmp_path / "short.txt").write_text("only a few words")
    with pytest.raises(UsageError, match="fewer than"):
        calibration_ids(opt_tokenizer, str(tmp_path / "short.txt"), nsamples=2, seqlen=64)


def test_eval_ids_join_rows_with_blank_lines(opt_tokenizer, shared):
    ids = eval_ids(opt_tokenizer, str(shared / "data" / "wikitext2-raw-v1-test.parquet"))
    # data/README.md: "\n\n".join(rows) is 287,645 OPT tokens
    assert ids.shape == (1, 287645)


def test_bad_bytes_and_broken_rows_name_the_file(tmp_path):
    from faspx.data import check_text_source

    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin1\.txt is not UTF-8 text \(byte 3"):
        load_texts(str(tmp_path / "latin1.txt"))
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n{"text": 3}\n')
    with pytest.raises(UsageError, match=r"rows\.jsonl line 2"):
        load_texts(str(tmp_path / "rows.jsonl"))
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(UsageError, match="holds no text"):
        check_text_source(str(tmp_path / "blank.txt"), "--calib")
