"""Pretrain a graph-routed BERT-style encoder with masked LM, draw its routing, fine-tune it as a classifier.

    python examples/train_encoder.py                 # 300 MLM + 300 classifier steps: about 65 s on 2 CPU cores
    python examples/train_encoder.py --max-steps 1000 --router linear
    python examples/train_encoder.py --classify-steps 0 --data my_texts/   # MLM only, on your own text files

Step 1 is ``gohgraph train --objective mlm``: a GoHEncoder (bidirectional self-attention, graph
router with 1 shared + top-2 of 3 routed heads and inter-head flow, RoPE positions, exact-GELU
MLP) learns to predict BERT-masked bytes (15%: 80% [MASK], 10% random, 10% kept) of the Python
standard library. It prints the validation MLM loss next to the unigram entropy of the training
bytes, the loss of a model that ignores the context. Step 2 collects the encoder's routing
statistics over validation text and draws them. Step 3 (``--classify-steps``, 0 to skip) is
``gohgraph train --objective classify --init-from <the MLM model>``: the encoder, with a new head,
learns which of 8 standard-library packages a 128-byte snippet comes from.

Results: ``runs/encoder-mlm/`` (``final/`` in save_pretrained format, ``metrics.json``,
``metrics.csv``, ``checkpoints/``, ``stats/``, ``pictures/``) and ``runs/encoder-mlm-classify/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gohgraph.cli.main import main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=300, help="masked-LM steps")
    parser.add_argument("--classify-steps", type=int, default=300,
                        help="classifier fine-tuning steps from the MLM encoder (0: skip)")
    parser.add_argument("--router", default=None, help="dense, linear, graph (default) or query-norm")
    parser.add_argument("--run-dir", type=Path, default=Path("runs") / "encoder-mlm")
    parser.add_argument("--data", default=None, help="text file, directory or glob (default: the standard library)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="model or training setting of the MLM run, as gohgraph train --set (e.g. d_model=64)")
    parser.add_argument("--stats-batches", type=int, default=10, help="validation batches for routing statistics")
    return parser.parse_args()


def run(argv) -> None:
    code = main(argv)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    args = parse_args()
    train = ["train", "--objective", "mlm", "--run-dir", str(args.run_dir), "--max-steps", str(args.max_steps),
             "--overwrite"]
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
    mlm = json.loads((args.run_dir / "metrics.json").read_text(encoding="utf-8"))[-1]

    classify_dir = args.run_dir.parent / f"{args.run_dir.name}-classify"
    if args.classify_steps:
        run(["train", "--objective", "classify", "--init-from", str(final), "--run-dir", str(classify_dir),
             "--max-steps", str(args.classify_steps), "--overwrite", "--no-progress"])
    print()
    print(f"masked LM after {mlm['step']} steps: {mlm['loss']:.4f} nats per masked byte")
    if args.classify_steps:
        classify = json.loads((classify_dir / "metrics.json").read_text(encoding="utf-8"))[-1]
        print(f"classifier after {classify['step']} steps from the MLM encoder: accuracy {classify['accuracy']:.4f}")
        print(f"classifier:  {classify_dir / 'final'}")
    print(f"encoder:     {final}")
    print(f"statistics:  {args.run_dir / 'stats'}")
    print(f"pictures:    {args.run_dir / 'pictures'}")
