"""Train a graph-routed encoder-decoder to write a function's ``def`` line from its docstring (no download).

    python examples/train_seq2seq.py                 # 300 steps of 16 pairs of up to 64 bytes
    python examples/train_seq2seq.py --max-steps 1000 --router linear
    python examples/train_seq2seq.py --data pairs.tsv   # your own source<TAB>target pairs (or .jsonl)

Same as ``gohgraph train --objective seq2seq``: a GoHSeq2Seq (2 encoder + 2 decoder layers; graph
router with 1 shared + top-2 of 3 routed heads and inter-head flow in each of the three attention
kinds; RoPE in the self-attentions) learns, byte by byte, to turn a docstring of the Python
standard library into the header of its function::

    "Return the sum of a and b."  ->  "def add(a: int, b: int=0) -> int:"

It prints the validation loss, the teacher-forced token accuracy next to the copy baseline's
(target byte t predicted to be source byte t), and the exact match of greedy generation, then
collects routing statistics per attention kind (encoder, decoder_self, cross) and draws them.
Results land in ``runs/seq2seq/``: ``final/`` (save_pretrained format, ``gohgraph.from_pretrained``
loads it), ``metrics.json``, ``stats/`` and ``pictures/``. On a busy machine run it with
``OMP_NUM_THREADS=1``: under load, PyTorch's default threads made greedy decoding about 100 times
slower (BENCHMARKS.md, seq2seq section).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gohgraph.cli.main import main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=None, help="default: the preset's (300)")
    parser.add_argument("--router", default=None, help="dense, linear, graph (default) or query-norm")
    parser.add_argument("--run-dir", type=Path, default=Path("runs") / "seq2seq")
    parser.add_argument("--data", default=None,
                        help=".tsv/.jsonl pair file, directory or glob (default: the standard library's "
                             "docstring -> def line pairs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="model or training setting, as gohgraph train --set (e.g. d_model=64)")
    parser.add_argument("--stats-batches", type=int, default=4, help="validation batches for routing statistics")
    return parser.parse_args()


def run(argv) -> None:
    code = main(argv)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    args = parse_args()
    train = ["train", "--objective", "seq2seq", "--run-dir", str(args.run_dir), "--overwrite"]
    if args.max_steps is not None:
        train += ["--max-steps", str(args.max_steps)]
    if args.router:
        train += ["--router", args.router]
    if args.data:
        train += ["--data", args.data]
    for setting in args.set:
        train += ["--set", setting]
    run(train)
    final, data = args.run_dir / "final", ["--data", args.data] if args.data else []
    batches = ["--batches", str(args.stats_batches), "--batch-size", "8", "--no-progress", "--overwrite"]
    run(["stats", "--checkpoint", str(final), *data, *batches, "--out", str(args.run_dir / "stats" / "stats.json"),
         "--csv", str(args.run_dir / "stats" / "stats.csv")])
    run(["viz", "--checkpoint", str(final), *data, *batches, "--out", str(args.run_dir / "pictures")])
    metrics = json.loads((args.run_dir / "metrics.json").read_text(encoding="utf-8"))[-1]
    print()
    print(f"after {metrics['step']} steps: token accuracy {metrics['token_accuracy']:.4f} "
          f"(copy baseline {metrics['copy_token_accuracy']:.4f}), exact match {metrics['exact_match']:.4f}, "
          f"loss {metrics['loss']:.4f} nats/token")
    print(f"final model: {final}")
    print(f"statistics:  {args.run_dir / 'stats'}")
    print(f"pictures:    {args.run_dir / 'pictures'}")
    print(f"try:         gohgraph generate --checkpoint {final} --temperature 0 "
          "--prompt 'Return the sum of a and b.'")
