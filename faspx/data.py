"""Text for calibration and evaluation: WikiText-2, C4, or a local .txt/.jsonl/.parquet file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from faspx.errors import FaspxError, UsageError
from faspx.models import hub_offline

# The hub datasets behind the names (the SparseGPT/Wanda choices).
C4_SHARD = "en/c4-validation.00000-of-00008.json.gz"
NAMED = ("wikitext2", "c4")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


def load_texts(source: str, split: str = "train") -> list[str]:
    """Documents of ``source``: ``wikitext2`` / ``c4`` from the hub, or a local file.

    A ``.txt`` file is one document; ``.jsonl`` and ``.parquet`` need a ``text`` field per row.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.txt"; _ = p.write_text("hello")
        >>> load_texts(str(p))
        ['hello']
    """
    path = Path(source).expanduser()
    if source not in NAMED:
        if not path.is_file():
            raise UsageError(f"text source {source!r} is neither {' / '.join(NAMED)} nor an existing file")
        return _read_local(path)
    if hub_offline():
        raise FaspxError(
            f"dataset {source!r} comes from the Hugging Face hub, which is offline (HF_HUB_OFFLINE is set); "
            "pass a local .txt/.jsonl/.parquet file instead"
        )
    from datasets import load_dataset

    try:
        if source == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        else:
            rows = load_dataset("allenai/c4", data_files={"validation": C4_SHARD}, split="validation")
    except Exception as err:  # noqa: BLE001 - network/cache failures come in many types
        raise FaspxError(f"could not load {source!r} from the hub ({err}); pass a local file instead") from err
    return list(rows["text"])


def _read_local(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [path.read_text()]
    if path.suffix == ".jsonl":
        with path.open() as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if rows and "text" not in rows[0]:
            raise UsageError(f"{path}: jsonl rows need a 'text' field")
        return [r["text"] for r in rows]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise UsageError(f"{path}: parquet file needs a 'text' column (has {table.column_names})")
        return table.column("text").to_pylist()
    raise UsageError(f"{path}: unsupported text file; use one of {', '.join(LOCAL_SUFFIXES)}")


def calibration_ids(tokenizer, source: str, nsamples: int = 128, seqlen: int = 2048, seed: int = 0) -> torch.Tensor:
    """(nsamples x seqlen) token windows: documents shuffled with ``seed``, joined with blank lines,
    cut into consecutive non-overlapping windows. UsageError when the text is too short.

    Example:
        >>> ids = calibration_ids(tok, "c4", nsamples=8, seqlen=512)  # doctest: +SKIP
    """
    if nsamples < 1 or seqlen < 2:
        raise UsageError(f"need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    docs = load_texts(source, split="train")
    random.Random(seed).shuffle(docs)
    need = nsamples * seqlen
    # Tokenize documents in chunks until there are enough tokens: C4 is far longer than needed.
    ids: list[int] = []
    start = 0
    while len(ids) < need and start < len(docs):
        chunk = docs[start:start + 64]
        text = "\n\n".join(chunk) if start == 0 else "\n\n" + "\n\n".join(chunk)
        ids.extend(tokenizer(text, add_special_tokens=start == 0).input_ids)
        start += 64
    if len(ids) < need:
        raise UsageError(
            f"calibration text {source!r} has {len(ids)} tokens, fewer than the {need} needed for "
            f"{nsamples} windows of {seqlen}; give more text or lower --nsamples/--seqlen"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(nsamples, seqlen)


def eval_ids(tokenizer, source: str) -> torch.Tensor:
    """The whole evaluation text as one (1 x N) token row: test split rows joined with "\\n\\n"."""
    split = "test" if source == "wikitext2" else "validation"
    docs = load_texts(source, split=split)
    return tokenizer("\n\n".join(docs), return_tensors="pt").input_ids
