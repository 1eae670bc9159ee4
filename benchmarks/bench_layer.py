"""Forward+backward time of one GoH block and one MoH block as ratios to a dense MHA block.

Measured in one run, interleaved (dense, MoH, GoH, dense, ...) so that machine noise hits every
variant alike; the reported number is the median over repeats. Absolute times are printed for
context only: on a shared machine they are noise, the ratios are the result.

    python benchmarks/bench_layer.py                     # d_model=256, 8 heads, seq 256, batch 8
    python benchmarks/bench_layer.py --no-fused          # GoH with the PyG propagate router path
"""

from __future__ import annotations

import argparse
import functools

import torch

from gohgraph import GoHConfig, HeadRouter
from gohgraph.analysis.timing import interleaved_median_seconds
from gohgraph.models.block import GoHBlock


def variants(args) -> dict:
    base = dict(d_model=args.d_model, n_heads=args.heads, n_layers=1, max_seq_len=args.seq)
    return {
        "dense MHA": GoHConfig(**base, router="dense"),
        "MoH (linear router)": GoHConfig(**base, router="linear", n_shared_heads=2, top_k_heads=4),
        f"GoH (graph, {args.rounds} rounds, flow)": GoHConfig(
            **base, router="graph", n_shared_heads=2, top_k_heads=4, router_rounds=args.rounds,
            head_graph=args.graph, inter_head_flow=True),
    }


def forward_backward(block: GoHBlock, x: torch.Tensor) -> None:
    y, routing = block(x)
    loss = y.float().square().mean() + sum(routing.aux_losses.values(), torch.zeros(()))
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--graph", default="complete")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-fused", action="store_true", help="use the PyG propagate path in the router")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    blocks = {name: GoHBlock(cfg, 0) for name, cfg in variants(args).items()}
    for block in blocks.values():
        if block.attn.head_routing is not None and isinstance(block.attn.head_routing.router, HeadRouter):
            block.attn.head_routing.router.fused = not args.no_fused
    x = torch.randn(args.batch, args.seq, args.d_model, requires_grad=True)
    medians = interleaved_median_seconds(
        {name: functools.partial(forward_backward, block, x) for name, block in blocks.items()},
        repeats=args.repeats, warmup=3)

    dense = medians["dense MHA"]
    print(f"one block fwd+bwd, d_model={args.d_model}, heads={args.heads}, seq={args.seq}, "
          f"batch={args.batch}, float32, {args.threads} threads, torch {torch.__version__}, "
          f"router path: {'PyG propagate' if args.no_fused else 'fused'}")
    print("| variant | median ms | ratio to dense |\n|---|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {1000 * median:.1f} | {median / dense:.3f}x |")


if __name__ == "__main__":
    main()
