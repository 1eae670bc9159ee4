"""Validation batches for a seq2seq checkpoint: source/target pairs from a TSV file, padded.

``gohgraph stats`` and ``gohgraph viz`` run a seq2seq model over dict batches ``{"input_ids"
[batch, src], "attention_mask" [batch, src], "labels" [batch, tgt]}`` (source padding 0 in the
mask, target padding ``-100`` in the labels). :func:`seq2seq_validation_batches` is the one place
the commands take them from. ``gohgraph.data`` has no pair-corpus builder yet, so this reads the
pairs itself: ``--data PAIRS.tsv``, one ``source<TAB>target`` pair per line (the run's
``tokenizer.json`` encodes them, bytes otherwise); when a seq2seq data builder lands in
``gohgraph.data`` (with a default corpus of pairs), this function should return its validation
batches instead, and the commands need no change.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from ..data.tokenizers import TOKENIZER_FILE, ByteTokenizer, load_tokenizer
from ..models.seq2seq import IGNORE_INDEX
from .common import _batch_shape, find_run_file

Seq2SeqBatch = Dict[str, torch.Tensor]


def seq2seq_validation_batches(args: argparse.Namespace, model, checkpoint: Path) -> Tuple[List[Seq2SeqBatch], object]:
    """``--batches`` dict batches of ``--batch-size`` pairs from the ``--data`` TSV file, and the tokenizer.

    Source and target are each cut to ``--seq-len`` tokens (default ``min(256, max_seq_len)``);
    the pairs are taken in file order, so the same file gives the same batches.
    """
    cfg = model.config
    seq_len = _batch_shape(args, cfg)
    paths = args.data or []
    if len(paths) != 1 or ("=" in paths[0] and not Path(paths[0]).exists()):  # NAME=PATH sources: not pairs
        raise ValueError("a seq2seq checkpoint reads one --data PAIRS.tsv file (source<TAB>target per line); "
                         f"got --data {paths or 'nothing'} (no default pair corpus exists yet)")
    tokenizer_file = find_run_file(checkpoint, TOKENIZER_FILE)
    tokenizer = load_tokenizer(tokenizer_file.parent) if tokenizer_file else ByteTokenizer()
    pairs = read_pairs(Path(paths[0]))
    needed = args.batches * args.batch_size
    encoded = [(tokenizer.encode(source)[:seq_len], tokenizer.encode(target)[:seq_len])
               for source, target in pairs[:needed]]
    top = max((max(ids) for pair in encoded for ids in pair if ids), default=0)
    if top >= cfg.vocab_size:
        raise ValueError(f"the pairs' token ids reach {top} but the checkpoint's vocab_size={cfg.vocab_size}; "
                         "use the tokenizer the model was trained with")
    batches = [pad_pairs(encoded[start:start + args.batch_size], cfg.pad_token_id)
               for start in range(0, len(encoded), args.batch_size)]
    return batches, tokenizer


def read_pairs(path: Path) -> List[Tuple[str, str]]:
    """``(source, target)`` of every non-empty line ``source<TAB>target``; ``ValueError`` naming a bad line."""
    if not path.is_file():
        raise FileNotFoundError(f"--data {path} is not a file of source<TAB>target pairs")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"{path}:{number}: expected 'source<TAB>target', got {line[:60]!r}")
        pairs.append((parts[0], parts[1]))
    if not pairs:
        raise ValueError(f"{path} holds no source<TAB>target pair")
    return pairs


def pad_pairs(pairs: Sequence[Tuple[Sequence[int], Sequence[int]]], pad_token_id: int) -> Seq2SeqBatch:
    """Right-pad token-id pairs into ``input_ids`` / ``attention_mask`` ``[batch, src]`` and
    ``labels [batch, tgt]`` (``-100`` after each target)."""
    src = max(len(source) for source, _ in pairs)
    tgt = max(len(target) for _, target in pairs)
    input_ids = torch.full((len(pairs), src), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(pairs), src, dtype=torch.long)
    labels = torch.full((len(pairs), tgt), IGNORE_INDEX, dtype=torch.long)
    for row, (source, target) in enumerate(pairs):
        input_ids[row, :len(source)] = torch.tensor(source, dtype=torch.long)
        attention_mask[row, :len(source)] = 1
        labels[row, :len(target)] = torch.tensor(target, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
