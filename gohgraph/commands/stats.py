"""``gohgraph stats``: routing statistics of a checkpoint over validation data.

    gohgraph stats --checkpoint runs/x/final --out stats.json [--data PATH] [--batches 20]
                   [--batch-size 8] [--seq-len 256] [--csv stats.csv] [--compare runs/y/final]

Writes the :meth:`~gohgraph.stats.RoutingStats.report` as JSON (plus routing drift against
``--compare``), optionally the long CSV, and prints one summary line per layer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch

SEARCH_LEVELS = 2  # runs/<name>/checkpoints/step_N -> runs/<name>


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="directory written by save_pretrained / training")
    parser.add_argument("--out", required=True, help="where to write the statistics JSON")
    add_data_arguments(parser, default_batches=20)
    parser.add_argument("--csv", default=None, help="also write the statistics as a long CSV table")
    parser.add_argument("--compare", default=None, metavar="CHECKPOINT",
                        help="also report routing drift: the share of tokens whose active heads/experts "
                             "differ from this checkpoint")


def add_data_arguments(parser: argparse.ArgumentParser, default_batches: int) -> None:
    parser.add_argument("--data", default=None,
                        help="text file, directory or glob (default: the Python standard library corpus)")
    parser.add_argument("--batches", type=int, default=default_batches, help="validation batches to run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: min(256, max_seq_len))")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from gohgraph import GoHTransformer
    from gohgraph.stats import collect_routing_stats, routing_drift

    model = GoHTransformer.from_pretrained(args.checkpoint)
    batches, _ = validation_batches(args, model)
    stats = collect_routing_stats(model, batches, progress=not args.no_progress)
    report = stats.report()
    if args.compare:
        other = GoHTransformer.from_pretrained(args.compare)
        report["drift"] = {"against": str(args.compare), **routing_drift(model, other, batches)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.csv:
        stats.to_csv(args.csv)
    for line in summary_lines(report):
        print(line)
    print(f"wrote {out}" + (f" and {args.csv}" if args.csv else ""))
    return 0


def validation_batches(args: argparse.Namespace, model) -> Tuple[List[torch.Tensor], object]:
    """``--batches`` batches ``[batch, seq]`` of validation tokens and the model's tokenizer.

    Text comes from ``--data`` (default corpus otherwise). If the run saved a ``tokenizer.json``
    (BPE), the validation text is re-encoded with it so ids match the model's vocabulary.
    """
    from gohgraph.data import eval_batches, load_corpus, load_tokenizer

    cfg = model.config
    for name in ("batches", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    seq_len = args.seq_len if args.seq_len is not None else min(256, cfg.max_seq_len)
    if not 1 <= seq_len <= cfg.max_seq_len:
        raise ValueError(f"--seq-len={seq_len} must be in [1, max_seq_len={cfg.max_seq_len}]")
    corpus = load_corpus(args.data)
    tokenizer_dir = find_run_file(args.checkpoint, "tokenizer.json")
    tokenizer = load_tokenizer(tokenizer_dir.parent) if tokenizer_dir else corpus.tokenizer
    tokens = corpus.val
    if tokenizer_dir is not None:
        needed = args.batches * args.batch_size * seq_len
        text = corpus.decode(corpus.val[:8 * needed].tolist())  # BPE tokens span several bytes
        tokens = torch.tensor(tokenizer.encode(text), dtype=torch.long).numpy()
    if len(tokens) and int(tokens.max()) >= cfg.vocab_size:
        raise ValueError(f"the data's token ids reach {int(tokens.max())} but the checkpoint's vocab_size="
                         f"{cfg.vocab_size}; use the tokenizer the model was trained with")
    return list(eval_batches(tokens, args.batch_size, seq_len, max_batches=args.batches)), tokenizer


def find_run_file(checkpoint: str, name: str) -> Optional[Path]:
    """``name`` in the checkpoint directory or up to two parents (``runs/<run>/checkpoints/step_N``)."""
    directory = Path(checkpoint).resolve()
    for candidate in [directory, *directory.parents][:SEARCH_LEVELS + 1]:
        if (candidate / name).is_file():
            return candidate / name
    return None


def summary_lines(report: dict) -> Iterator[str]:
    """One human-readable line per layer, then the drift if measured."""
    yield f"routing statistics over {report['tokens']} tokens ({report['batches']} batches)"
    for layer in report["layers"]:
        heads = layer["heads"]
        line = f"layer {layer['layer']}: {heads['active_per_token']:.2f} active heads/token"
        if "load_cv" in heads:
            line += f", head load CV {heads['load_cv']:.3f} entropy {heads['load_entropy']:.3f}"
        line += f", dead heads {heads['dead']}"
        experts = layer.get("experts")
        if experts is not None:
            line += (f" | experts: load CV {experts['load_cv']:.3f} entropy {experts['load_entropy']:.3f} "
                     f"max/mean {experts['max_over_mean_load']:.2f} dead {experts['dead']}")
            if "drop_rate" in experts:
                line += f" drop rate {experts['drop_rate']:.3%}"
        yield line
    drift = report.get("drift")
    if drift is not None:
        yield (f"routing drift vs {drift['against']}: {drift['token_drift']:.1%} of tokens change route "
               f"(head drift per layer {[round(layer['head_drift'], 3) for layer in drift['layers']]})")
