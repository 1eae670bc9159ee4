"""Train a graph-routed BERT-style encoder with masked-LM on the default corpus (no download).

    python examples/train_encoder.py                 # 300 steps: about 40 s on 2 quiet CPU cores
    python examples/train_encoder.py --max-steps 1000 --router linear

Same as ``gohgraph train --objective mlm``: a GoHEncoder (bidirectional self-attention, graph
router with 1 shared + top-2 of 3 routed heads and inter-head flow, RoPE positions, exact-GELU
MLP) learns to predict BERT-masked bytes (15%: 80% [MASK], 10% random, 10% kept) of the Python
standard library. It prints the validation MLM loss next to the unigram entropy of the training
bytes, the loss of a model that ignores the context. Results land in ``runs/encoder-mlm/``:
``final/`` (save_pretrained format, ``gohgraph.from_pretrained`` loads it), ``metrics.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gohgraph.cli.main import main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--router", default=None, help="dense, linear, graph (default) or query-norm")
    parser.add_argument("--run-dir", type=Path, default=Path("runs") / "encoder-mlm")
    parser.add_argument("--data", default=None, help="text file, directory or glob (default: the standard library)")
    return parser.parse_args()


if __name__ == "__main__":
    args = parse_args()
    argv = ["train", "--objective", "mlm", "--run-dir", str(args.run_dir), "--max-steps", str(args.max_steps),
            "--overwrite"]
    if args.router:
        argv += ["--router", args.router]
    if args.data:
        argv += ["--data", args.data]
    sys.exit(main(argv))
