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
    path = _local_or_named(source, "text source")
    if path is not None:
        return _read_local(path)
    from datasets import load_dataset

    try:
        if source == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        else:
            rows = load_dataset("allenai/c4", data_files={"validation": C4_SHARD}, split="validation")
    except Exception as err:  # noqa: BLE001 - network/cache failures come in many types
        raise FaspxError(f"could not load {source!r} from the hub ({err}); pass a local file instead") from err
    return list(rows["text"])


def check_text_source(source: str, what: str = "text") -> None:
    """Every check of a text source that needs no model (UsageError): a named set needs the hub, a
    file must exist, parse and hold some text. ``what`` names the option in the message.

    Example:
        >>> check_text_source("/no/such.txt", "--calib")
        Traceback (most recent call last):
        ...
        faspx.errors.UsageError: --calib '/no/such.txt' is neither wikitext2 / c4 nor an existing file
    """
    path = _local_or_named(source, what)
    if path is not None and not any(doc.strip() for doc in _read_local(path)):
        raise UsageError(f"{what} {path} holds no text")


def _local_or_named(source: str, what: str) -> Path | None:
    """The local file ``source`` names (None for a hub set); UsageError when it is neither an existing
    file nor a hub set that can be reached (the hub offline)."""
    if source in NAMED:
        if hub_offline():
            raise UsageError(f"{what} {source!r} comes from the Hugging Face hub, which is offline (HF_HUB_OFFLINE "
                             "is set); pass a local .txt/.jsonl/.parquet file instead")
        return None
    path = Path(source).expanduser()
    if not path.is_file():
        raise UsageError(f"{what} {source!r} is neither {' / '.join(NAMED)} nor an existing file")
    return path


def _read_local(path: Path) -> list[str]:
    if path.suffix not in LOCAL_SUFFIXES:
        raise UsageError(f"{path}: unsupported text file; use one of {', '.join(LOCAL_SUFFIXES)}")
    try:
        if path.suffix == ".txt":
            return [path.read_text(encoding="utf-8")]
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except UsageError:
        raise
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); convert it to UTF-8") from None
    except OSError as err:
        raise UsageError(f"{path} could not be read: {err}") from None
    except Exception as err:  # noqa: BLE001 - pyarrow raises its own types for a damaged file
        raise UsageError(f"{path} could not be read as parquet: {err}") from None
    if "text" not in table.column_names:
        raise UsageError(f"{path}: parquet file needs a 'text' column (has {table.column_names})")
    return [t for t in table.column("text").to_pylist() if t is not None]


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{path} line {number} is not JSON: {err.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise UsageError(f"{path} line {number}: jsonl rows need a 'text' field holding a string")
            texts.append(row["text"])
    return texts


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
