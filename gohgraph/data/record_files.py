"""User data as records: text pairs (seq2seq) and labelled texts (classification), from TSV or JSONL.

Formats, chosen by the file's extension (``.tsv`` or ``.jsonl``), one record per line, blank lines
skipped, UTF-8:

* pairs: ``source<TAB>target``, or ``{"source": "...", "target": "..."}``;
* labelled texts: ``label<TAB>text``, or ``{"text": "...", "label": "..." | 7}``.

A TSV line holds exactly one tab (texts with tabs or newlines go in JSONL). A malformed line stops
the load with one line naming the file, the line number and what is wrong (docs/contract.md), e.g.
``pairs.tsv:12: expected 'source<TAB>target', found no tab``. Sizes are bounded so that a wrong
file cannot exhaust memory: :data:`MAX_RECORD_FILE_BYTES` per file, :data:`MAX_TEXT_CHARS` per text,
:data:`MAX_LABELS` distinct labels.

:func:`load_records` reads a file, a directory or a glob (as ``--data`` does) and splits it into
train and validation by file, with the corpus's path hash; when that leaves a side empty (one
file), the last :data:`FALLBACK_VAL_PERCENT` % of the records are the validation side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

from .corpus import VAL_PERCENT, _path_hash, _user_files
from .errors import DataError

MAX_RECORD_FILE_BYTES = 256 * 2 ** 20
MAX_TEXT_CHARS = 100_000
MAX_LABELS = 10_000
FALLBACK_VAL_PERCENT = 10
RECORD_KINDS = ("pairs", "labelled")
EXTENSIONS = (".tsv", ".jsonl")

Record = Tuple[str, str]  # pairs: (source, target); labelled: (text, label)


def read_records(path: Path, kind: str) -> List[Record]:
    """The records of one ``.tsv`` / ``.jsonl`` file: ``(source, target)`` for ``kind="pairs"``,
    ``(text, label)`` for ``kind="labelled"`` (a JSON integer label becomes its decimal text).

    Raises :class:`DataError` naming the file and line of the first malformed record.
    """
    if kind not in RECORD_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {list(RECORD_KINDS)}")
    path = Path(path)
    if path.suffix not in EXTENSIONS:
        raise DataError(f"{path}: {kind} files must end in {' or '.join(EXTENSIONS)} (the format), got {path.suffix!r}")
    size = path.stat().st_size
    if size > MAX_RECORD_FILE_BYTES:
        raise DataError(f"{path}: {size:,} bytes exceeds the {MAX_RECORD_FILE_BYTES:,}-byte limit of a record file; "
                        "split it into several files in one directory")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start:err.start + 1]!r})") from None
    parse = _parse_tsv if path.suffix == ".tsv" else _parse_jsonl
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            record = parse(line, kind)
            if isinstance(record, str):
                raise DataError(f"{path}:{number}: {record}")
            records.append(record)
    if not records:
        raise DataError(f"{path}: no records (every line is blank)")
    return records


def _parse_tsv(line: str, kind: str):
    """``(first, second)`` of a TSV record in the order :func:`read_records` returns, or an error text."""
    names = ("source", "target") if kind == "pairs" else ("label", "text")
    fields = line.split("\t")
    if len(fields) != 2:
        found = "no tab" if len(fields) == 1 else f"{len(fields) - 1} tabs"
        return f"expected '{names[0]}<TAB>{names[1]}', found {found} (use JSONL for texts with tabs)"
    problem = _check_texts(dict(zip(names, fields)))
    if problem:
        return problem
    return tuple(fields) if kind == "pairs" else (fields[1], fields[0])


def _parse_jsonl(line: str, kind: str):
    names = ("source", "target") if kind == "pairs" else ("text", "label")
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(value, dict) or set(names) - set(value):
        return f"expected a JSON object with keys {list(names)}, got {_shorten(line)}"
    first, second = value[names[0]], value[names[1]]
    if kind == "labelled" and type(second) is int:
        second = str(second)
    for name, item in zip(names, (first, second)):
        if not isinstance(item, str):
            return f"{name!r} must be a string{' or an integer' if name == 'label' else ''}, got {type(item).__name__}"
    problem = _check_texts(dict(zip(names, (first, second))))
    return problem or (first, second)


def _check_texts(fields: dict) -> str:
    for name, value in fields.items():
        if not value.strip():
            return f"{name!r} is empty"
        if len(value) > MAX_TEXT_CHARS:
            return f"{name!r} has {len(value):,} characters, over the limit of {MAX_TEXT_CHARS:,}"
    return ""


def _shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width] + "..."


def load_records(data: str, kind: str) -> Tuple[List[Record], List[Record], List[Path]]:
    """``(train, val, files)``: the records of every file ``data`` names (a file, a directory or a
    glob; ``.tsv``/``.jsonl`` only), split by file (module docstring)."""
    root, files = _user_files(data)
    train, val = [], []
    for path in files:
        records = read_records(path, kind)
        is_val = _path_hash(path.relative_to(root).as_posix()) % 100 < VAL_PERCENT
        (val if is_val else train).extend(records)
    if not train or not val:
        records = train + val
        if len(records) < 2:
            raise DataError(f"data={data!r}: {len(records)} record; need at least 2 (one to validate on)")
        cut = min(len(records) - 1, int(len(records) * (100 - FALLBACK_VAL_PERCENT) / 100))
        train, val = records[:cut], records[cut:]
    return train, val, files


def label_names(train: List[Record], val: List[Record], where: str) -> List[str]:
    """The sorted distinct labels of labelled records; at least 2, at most :data:`MAX_LABELS`, and
    every validation label seen in training (a class never trained on cannot be scored fairly)."""
    names = sorted({label for _, label in train})
    unseen = sorted({label for _, label in val} - set(names))
    if unseen:
        raise DataError(f"{where}: validation labels {unseen[:5]} never occur in the training records")
    if not 2 <= len(names) <= MAX_LABELS:
        raise DataError(f"{where}: {len(names)} distinct labels; classification needs 2 to {MAX_LABELS:,}")
    return names

