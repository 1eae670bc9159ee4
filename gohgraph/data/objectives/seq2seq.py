"""Sequence-to-sequence pairs and their batches (docs/seq2seq.md): a function's docstring -> its ``def`` line.

The default task needs no download: every function and method of the standard-library files the
default corpus reads (:func:`~gohgraph.data.corpus.load_corpus`, same files, same cap) that has a
docstring gives the pair ``(docstring, header)``, the docstring as :func:`ast.get_docstring` cleans
it and the header as :func:`ast.unparse` writes it on one line without decorators or body::

    ("Return the sum of a and b.", "def add(a: int, b: int=0) -> int:")

Files go to train or validation by the corpus's path hash (with a larger validation share: the
4 MB default holds about 1,300 documented functions), so no function is on both sides. User
pairs come from TSV/JSONL files (:mod:`gohgraph.data.record_files`). Batches are what the
encoder-decoder model takes: ``input_ids [batch, src]``, ``attention_mask [batch, src]`` (1 =
token) and ``labels [batch, tgt]`` (target ids, ``eos_id`` last, ``-100`` on padding); the model
shifts ``labels`` right itself to make its decoder inputs.
"""

from __future__ import annotations

import ast
import copy
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..corpus import DEFAULT_CORPUS_BYTES, _path_hash, _stdlib_files
from ..errors import DataError
from ..record_files import load_records
from ..tokenizers import ByteTokenizer

Pair = Tuple[str, str]  # (source text, target text)
IGNORE_INDEX = -100  # label of a padded target position (cross-entropy's ignore_index)
# of the files: the LM corpus's 5% leaves about 10 validation pairs in the default 4 MB
SEQ2SEQ_VAL_PERCENT = 20


def docstring_def_pairs(source: str) -> List[Pair]:
    """``(docstring, def line)`` of every function and method of the Python ``source`` that has a
    docstring, in the order of their ``def`` lines. Raises ``SyntaxError`` for unparsable source."""
    pairs = []
    functions = [node for node in ast.walk(ast.parse(source))
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in sorted(functions, key=lambda node: (node.lineno, node.col_offset)):
        docstring = ast.get_docstring(node, clean=True)
        if docstring and docstring.strip():
            pairs.append((docstring, def_line(node)))
    return pairs


def def_line(node: ast.AST) -> str:
    """The one-line header of a function node: ``def name(args) -> annotation:`` (``async def`` for
    coroutines), without decorators, as :func:`ast.unparse` normalises it."""
    header = copy.copy(node)
    header.decorator_list = []
    header.body = [ast.Pass()]
    return ast.unparse(header).splitlines()[0]


@dataclass
class PairData:
    """Text pairs split by file: ``train`` and ``val`` lists of ``(source, target)``."""

    train: List[Pair]
    val: List[Pair]
    source: str


def stdlib_docstring_pairs(max_bytes: int = DEFAULT_CORPUS_BYTES) -> PairData:
    """Docstring -> ``def`` line pairs of the default corpus's standard-library files (the first
    ``max_bytes`` of them in the corpus's order); files that do not parse or decode are skipped,
    as the corpus skips the library's deliberately broken test files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val = [], []
    for path in _stdlib_files(root, max_bytes):
        try:
            pairs = docstring_def_pairs(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        is_val = _path_hash(path.relative_to(root).as_posix()) % 100 < SEQ2SEQ_VAL_PERCENT
        (val if is_val else train).extend(pairs)
    if not train or not val:
        raise DataError(f"the standard library under {root} gave {len(train)} training and {len(val)} "
                        "validation docstring pairs; both sides need some")
    return PairData(train, val, f"Python {sysconfig.get_python_version()} standard library ({root}): "
                                f"docstring -> def line")


def pair_file_data(data: str) -> PairData:
    """The ``(source, target)`` records of the ``.tsv`` / ``.jsonl`` pair files ``data`` names (a
    file, a directory or a glob), split into train and validation by file
    (:func:`~gohgraph.data.record_files.load_records`)."""
    train, val, files = load_records(data, "pairs")
    return PairData(train, val, f"{data}: {len(train) + len(val):,} pairs in {len(files)} file(s)")


def load_pair_data(data: Optional[str]) -> PairData:
    """The pairs of ``--data`` (:func:`pair_file_data`), else the standard library's docstring pairs."""
    return stdlib_docstring_pairs() if data is None else pair_file_data(data)


# ---------------------------------------------------------------------- encoding and batches
def encode_pairs(pairs: Sequence[Pair], encode: Callable[[str], List[int]], max_source_len: int,
                 max_target_len: int, eos_id: Optional[int]) -> List[Tuple[List[int], List[int]]]:
    """Token ids of each pair: the source cut to ``max_source_len`` tokens, the target cut to
    ``max_target_len - 1`` and ended by ``eos_id`` (so generation learns where to stop);
    ``eos_id=None`` (a model whose end token is unknown, e.g. a converted checkpoint): the target
    cut to ``max_target_len`` with nothing added."""
    if max_source_len < 1 or max_target_len < 2:
        raise ValueError(f"max_source_len={max_source_len} must be >= 1 and max_target_len={max_target_len} >= 2 "
                         "(one target token and the end-of-sequence token)")
    if eos_id is None:
        return [(encode(source)[:max_source_len], encode(target)[:max_target_len]) for source, target in pairs]
    return [(encode(source)[:max_source_len], encode(target)[:max_target_len - 1] + [eos_id])
            for source, target in pairs]


def collate_seq2seq(encoded: Sequence[Tuple[List[int], List[int]]], pad_id: int) -> Dict[str, torch.Tensor]:
    """One batch of encoded pairs, right-padded to its longest source and target:
    ``{"input_ids" [batch, src], "attention_mask" [batch, src], "labels" [batch, tgt]}`` with
    ``pad_id`` / 0 / ``-100`` on padding."""
    if not encoded:
        raise ValueError("collate_seq2seq needs at least one pair")
    src_len = max(len(source) for source, _ in encoded)
    tgt_len = max(len(target) for _, target in encoded)
    input_ids = torch.full((len(encoded), src_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), src_len), dtype=torch.long)
    labels = torch.full((len(encoded), tgt_len), IGNORE_INDEX, dtype=torch.long)
    for row, (source, target) in enumerate(encoded):
        input_ids[row, :len(source)] = torch.tensor(source, dtype=torch.long)
        attention_mask[row, :len(source)] = 1
        labels[row, :len(target)] = torch.tensor(target, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def seq2seq_batches(encoded: Sequence[Tuple[List[int], List[int]]], batch_size: int, pad_id: int,
                    seed: Optional[int] = None) -> Iterator[Dict[str, torch.Tensor]]:
    """Batches of :func:`collate_seq2seq` in storage order (``seed=None``: evaluation) or in a
    seeded random order (training); the last batch may be smaller."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    order = range(len(encoded)) if seed is None else \
        torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()
    order = list(order)
    for start in range(0, len(order), batch_size):
        yield collate_seq2seq([encoded[i] for i in order[start:start + batch_size]], pad_id)


def copy_baseline_counts(batch: Dict[str, torch.Tensor]) -> Tuple[int, int]:
    """``(correct, total)`` target tokens of the copy baseline, which predicts target token ``t`` to be
    source token ``t`` (a padded or missing source position counts as wrong)."""
    labels, inputs, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    width = min(labels.shape[1], inputs.shape[1])
    scored = labels != IGNORE_INDEX
    copied = torch.full_like(labels, IGNORE_INDEX)
    copied[:, :width] = torch.where(mask[:, :width].bool(), inputs[:, :width], IGNORE_INDEX)
    return int(((copied == labels) & scored).sum()), int(scored.sum())


@dataclass
class EncodedPairs:
    """Token ids of a :class:`PairData`: ``train`` / ``val`` lists of ``(source ids, target ids)``
    (targets ended by ``eos_id``), what :func:`seq2seq_batches` pads with ``pad_id``; and the
    tokenizer the ids are of (its special tokens follow its vocabulary)."""

    train: List[Tuple[List[int], List[int]]]
    val: List[Tuple[List[int], List[int]]]
    source: str
    pad_id: int
    eos_id: Optional[int]
    tokenizer: object = field(default_factory=ByteTokenizer)


def pair_texts(data: PairData) -> List[str]:
    """The sources and targets of the training pairs (what a BPE is trained on)."""
    return [text for pair in data.train for text in pair]


def encode_pair_data(data: PairData, encode: Callable[[str], List[int]], seq_len: int, pad_id: int,
                     eos_id: Optional[int], tokenizer=None) -> EncodedPairs:
    """:func:`encode_pairs` of both splits, sources and targets each cut to ``seq_len`` tokens;
    ``tokenizer``: the one ``encode`` belongs to (bytes when ``None``)."""
    return EncodedPairs(encode_pairs(data.train, encode, seq_len, seq_len, eos_id),
                        encode_pairs(data.val, encode, seq_len, seq_len, eos_id), data.source, pad_id, eos_id,
                        tokenizer if tokenizer is not None else ByteTokenizer())
