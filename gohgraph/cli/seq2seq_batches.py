"""Validation batches for a seq2seq checkpoint, from the data module's pair builders.

``gohgraph stats`` and ``gohgraph viz`` run a seq2seq model over dict batches ``{"input_ids"
[batch, src], "attention_mask" [batch, src], "labels" [batch, tgt]}`` (source padding 0 in the
mask, target padding ``-100`` in the labels). :func:`seq2seq_validation_batches` is the one place
the commands take them from. The pairs:

* ``--data PATH`` (a ``.tsv`` / ``.jsonl`` pair file, directory or glob,
  :mod:`gohgraph.data.record_files`): every pair of it, in file order;
* no ``--data``: the validation pairs of the data the run was trained on (its ``objective.json``),
  else of the default corpus (the standard library's docstring -> def line pairs,
  :func:`~gohgraph.data.objectives.seq2seq.stdlib_docstring_pairs`), in storage order.

The run's ``tokenizer.json`` encodes them (bytes otherwise). A checkpoint trained by ``gohgraph
train --objective seq2seq`` gets its targets ended by its end-of-sequence token, as in training;
any other (a converted T5, say) gets the targets as they are.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from ..data.objectives import SpecialTokens
from ..data.objectives.seq2seq import encode_pairs, load_pair_data, pair_file_data, seq2seq_batches
from ..data.tokenizers import TOKENIZER_FILE, ByteTokenizer, load_tokenizer
from ..training.run_dir import RunDir
from .common import _batch_shape, find_run_file

Seq2SeqBatch = Dict[str, torch.Tensor]


def seq2seq_validation_batches(args: argparse.Namespace, model, checkpoint: Path) -> Tuple[List[Seq2SeqBatch], object]:
    """``--batches`` dict batches of ``--batch-size`` pairs (module docstring), and the tokenizer.

    Source and target are each cut to ``--seq-len`` tokens (default ``min(256, max_seq_len)``).
    """
    cfg = model.config
    seq_len = _batch_shape(args, cfg)
    paths = args.data or []
    if len(paths) > 1 or (paths and "=" in paths[0] and not Path(paths[0]).exists()):  # NAME=PATH: not pairs
        raise ValueError("a seq2seq checkpoint reads one --data path of .tsv/.jsonl pair files "
                         f"(source<TAB>target per line); got --data {paths}")
    settings = run_objective(checkpoint)
    if paths:
        data = pair_file_data(paths[0])
        pairs = data.train + data.val
    else:
        pairs = load_pair_data(settings.get("data")).val
    tokenizer_file = find_run_file(checkpoint, TOKENIZER_FILE)
    tokenizer = load_tokenizer(tokenizer_file.parent) if tokenizer_file else ByteTokenizer()
    eos = SpecialTokens.of_model(cfg).eos if settings.get("objective") == "seq2seq" else None
    encoded = encode_pairs(pairs[:args.batches * args.batch_size], tokenizer.encode, seq_len, max(seq_len, 2), eos)
    top = max((max(ids) for pair in encoded for ids in pair if ids), default=0)
    if top >= cfg.vocab_size:
        raise ValueError(f"the pairs' token ids reach {top} but the checkpoint's vocab_size={cfg.vocab_size}; "
                         "use the tokenizer the model was trained with")
    return list(seq2seq_batches(encoded, args.batch_size, cfg.pad_token_id)), tokenizer


def run_objective(checkpoint: Path) -> dict:
    """The ``objective.json`` of the run ``checkpoint`` belongs to (``{}`` outside such a run)."""
    run = RunDir.of_checkpoint(checkpoint)
    return run.read_objective() if run is not None else {}
