"""Sequence classification on the default corpus: which standard-library package a snippet is from;
and on user-labelled files (:func:`labelled_file_data`).

Every ``.py`` file of the standard library inside a package (``email/``, ``asyncio/``, ...; not
``test/``, the tests of all the others) is cut into non-overlapping snippets of its tokens (bytes,
or a BPE trained on the training files); the label is the package. The ``n_classes`` packages with the
most snippets are kept. Files go to train or validation by the same path hash as the LM corpus
(with a larger validation share, so every class has validation files), so no file is on both sides.
"""

from __future__ import annotations

import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..corpus import DEFAULT_CORPUS_BYTES, _path_hash, _stdlib_files
from ..errors import DataError
from ..record_files import label_names, load_records
from ..tokenizers import ByteTokenizer, byte_encode

# "test" holds the tests of every other package: a snippet of it is about everything
EXCLUDED_PACKAGES = ("test",)
CLASSIFY_VAL_PERCENT = 20  # of the files: the LM corpus's 5% would leave some classes without validation


@dataclass
class ClassificationData:
    """``train_x [n, seq_len]`` / ``val_x`` token ids (first token ``cls``, right-padded with ``pad``),
    ``*_mask [n, seq_len]`` (1 = token), ``*_y [n]`` labels, the label names, and the tokenizer the
    ids are of (its special tokens follow its vocabulary)."""

    train_x: torch.Tensor
    train_mask: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_mask: torch.Tensor
    val_y: torch.Tensor
    labels: List[str]
    source: str
    tokenizer: object = field(default_factory=ByteTokenizer)

    def majority_accuracy(self) -> float:
        """Validation accuracy of always answering the most frequent training class."""
        majority = int(torch.bincount(self.train_y).argmax())
        return float((self.val_y == majority).float().mean())


PackageFile = Tuple[str, bool, str]  # (top-level package, is a validation file, text)


def stdlib_package_files(max_bytes: int = DEFAULT_CORPUS_BYTES) -> Tuple[Path, List[PackageFile]]:
    """The standard-library root and its package files (the default corpus's files, first
    ``max_bytes`` of them, not top-level modules, not ``test/``, only UTF-8 ones) with their side of
    the split (:data:`CLASSIFY_VAL_PERCENT` of the files by path hash)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in _stdlib_files(root, max_bytes):
        parts = path.relative_to(root).parts
        if len(parts) < 2 or parts[0] in EXCLUDED_PACKAGES:  # a top-level module belongs to no package
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append((parts[0], _path_hash(path.relative_to(root).as_posix()) % 100 < CLASSIFY_VAL_PERCENT, text))
    return root, files


def training_texts(files: Sequence[PackageFile]) -> List[str]:
    """The texts of the training side of :func:`stdlib_package_files` (what a BPE is trained on)."""
    return [text for _, is_val, text in files if not is_val]


def stdlib_package_snippets(seq_len: int, cls_id: int, pad_id: int, n_classes: int = 8,
                            max_bytes: int = DEFAULT_CORPUS_BYTES, min_snippet: int = 32,
                            encode: Callable[[str], List[int]] = byte_encode,
                            files: Optional[Tuple[Path, List[PackageFile]]] = None) -> ClassificationData:
    """Snippets of ``seq_len - 1`` tokens after ``cls_id`` (shorter file tails padded with ``pad_id``,
    kept when at least ``min_snippet`` tokens), labelled by their top-level standard-library package.

    Each file's whole text is encoded (``encode``, bytes by default) and its ids are cut into
    non-overlapping snippets: a BPE reads the file as it was trained on it (whole files), and
    no cut falls inside a token, so a snippet decodes to the text it covers (with bytes, a cut may
    still fall inside a character, as it always did). ``files``: :func:`stdlib_package_files`
    already read.
    """
    root, files = files if files is not None else stdlib_package_files(max_bytes)
    width = seq_len - 1
    shortest = min(min_snippet, width)
    per_file = []
    for package, is_val, text in files:
        ids = np.asarray(encode(text), dtype=np.int64)
        per_file.append((package, is_val, [ids[i:i + width] for i in range(0, len(ids), width)
                                           if len(ids[i:i + width]) >= shortest]))
    sizes, sides = Counter(), {}
    for package, is_val, snippets in per_file:
        sizes[package] += len(snippets)
        if snippets:
            sides.setdefault(package, set()).add(is_val)
    # only packages with snippets on both sides of the split can be learned and scored
    sizes = Counter({package: n for package, n in sizes.items() if len(sides.get(package, ())) == 2})
    labels = sorted(package for package, _ in sizes.most_common(n_classes))
    if len(labels) < 2:
        raise DataError(f"the standard library under {root} has fewer than 2 packages to classify")
    rows = {False: ([], []), True: ([], [])}
    for package, is_val, snippets in per_file:
        if package in labels:
            rows[is_val][0].extend(snippets)
            rows[is_val][1].extend([labels.index(package)] * len(snippets))
    x_train, m_train = _pack(rows[False][0], seq_len, cls_id, pad_id)
    x_val, m_val = _pack(rows[True][0], seq_len, cls_id, pad_id)
    return ClassificationData(x_train, m_train, torch.tensor(rows[False][1]), x_val, m_val,
                              torch.tensor(rows[True][1]), labels,
                              f"Python {sysconfig.get_python_version()} standard library ({root}), {len(labels)} packages")


def labelled_file_data(data: str, seq_len: int, cls_id: int, pad_id: int,
                       encode: Callable[[str], List[int]], records=None) -> ClassificationData:
    """User-labelled texts (``label<TAB>text`` TSV or ``{"text", "label"}`` JSONL files:
    :mod:`gohgraph.data.record_files`), split by file, each text encoded, cut to ``seq_len - 1``
    tokens after ``cls_id`` and right-padded; labels are the sorted distinct label names.
    ``records``: ``load_records(data, "labelled")`` already read."""
    train, val, files = records if records is not None else load_records(data, "labelled")
    labels = label_names(train, val, data)
    index = {name: i for i, name in enumerate(labels)}
    sides = []
    for side in (train, val):
        x, mask = _pack([encode(text)[:seq_len - 1] for text, _ in side], seq_len, cls_id, pad_id)
        sides.append((x, mask, torch.tensor([index[label] for _, label in side])))
    (x_train, m_train, y_train), (x_val, m_val, y_val) = sides
    return ClassificationData(x_train, m_train, y_train, x_val, m_val, y_val, labels,
                              f"{data} ({len(files)} file(s), {len(labels)} labels)")


def _pack(snippets: List[Sequence[int]], seq_len: int, cls_id: int, pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[cls, snippet..., pad...]`` of ``seq_len`` ids and their masks; a snippet is bytes or ids."""
    ids = np.full((len(snippets), seq_len), pad_id, dtype=np.int64)
    mask = np.zeros((len(snippets), seq_len), dtype=np.int64)
    for row, snippet in enumerate(snippets):
        ids[row, 0] = cls_id
        values = np.frombuffer(snippet, dtype=np.uint8) if isinstance(snippet, bytes) else np.asarray(snippet)
        ids[row, 1:1 + len(snippet)] = values
        mask[row, :1 + len(snippet)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def classification_batches(x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, batch_size: int,
                           seed: Optional[int] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(ids, mask, labels)`` batches in order (``seed=None``) or in a seeded random order."""
    order = torch.arange(len(y)) if seed is None else torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(y), batch_size):
        index = order[start:start + batch_size]
        yield x[index], mask[index], y[index]
