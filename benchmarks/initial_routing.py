"""How token-dependent is head routing at initialisation? MoH against GoH, before any training.

For fresh models of the comparison's quick setting (same seeds as the table), runs the first
validation windows and counts, per layer, which set of heads each token activates. It prints the
share of tokens whose set is the layer's most common one. The share is 1.0 when every token
picks the same heads, and near ``1 / C(routed, k)`` when picks are spread out. No timing: this
explains a loss difference in BENCHMARKS.md (comparison section, dense-to-sparse annealing).

    python benchmarks/initial_routing.py [--seeds 0 1 2] [--tokens 1024]
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import List

import torch

from gohgraph import GoHTransformer
from gohgraph.data.batches import eval_batches
from gohgraph.data.corpus import load_corpus
from gohgraph.experiments.variants import SETTINGS, comparison_variants, match_parameters


def most_common_set_share(head_gates: torch.Tensor) -> float:
    """``head_gates [batch, seq, heads]`` -> share of tokens whose active-head set is the most common."""
    active = (head_gates > 0).reshape(-1, head_gates.shape[-1])
    sets = Counter(tuple(row.nonzero().flatten().tolist()) for row in active)
    return sets.most_common(1)[0][1] / active.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tokens", type=int, default=1024, help="validation tokens (windows of 64)")
    args = parser.parse_args()

    model_shape, _ = SETTINGS["quick"]
    variants = match_parameters(comparison_variants(**model_shape, names=["dense", "MoH", "GoH"]))
    corpus = load_corpus(None)
    ids = next(eval_batches(corpus.val, batch_size=args.tokens // 64, seq_len=64, max_batches=1))

    print(f"quick setting, untrained models, {ids.numel()} validation tokens; share of tokens whose "
          f"active-head set is the layer's most common set")
    for name in ("MoH", "GoH"):
        for seed in args.seeds:
            torch.manual_seed(seed)  # as gohgraph.training.trainer.train does before building the model: the table's init
            model = GoHTransformer(variants[name].config).eval()
            with torch.no_grad():
                routing = model(ids).routing
            shares: List[float] = [most_common_set_share(layer.head_gates) for layer in routing]
            print(f"{name:4s} seed {seed}: " + "  ".join(f"layer {i} {s:.2f}" for i, s in enumerate(shares)))


if __name__ == "__main__":
    main()
