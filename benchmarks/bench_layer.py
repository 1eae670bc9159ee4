"""Forward+backward time of one GoH block and one MoH block as ratios to a dense MHA block.

Measured in one run, interleaved (dense, MoH, GoH, dense, ...) so that machine noise hits every
variant alike; the reported number is the median over repeats. Absolute times are printed for
context only: on a shared machine they are noise, the ratios are the result.

    python benchmarks/bench_layer.py                     # d_model=256, 8 heads, seq 256, batch 8
    python benchmarks/bench_layer.py --no-fused          # GoH with the PyG propagate router path
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gohgraph import GoHConfig
from gohgraph.model import GoHBlock


def variants(args) -> dict:
    base = dict(d_model=args.d_model, n_heads=args.heads, n_layers=1, max_seq_len=args.seq)
    return {
        "dense MHA": GoHConfig(**base, router="dense"),
        "MoH (linear router)": GoHConfig(**base, router="linear", n_shared_heads=2, top_k_heads=4),
        f"GoH (graph, {args.rounds} rounds, flow)": GoHConfig(
            **base, router="graph", n_shared_heads=2, top_k_heads=4, router_rounds=args.rounds,
            head_graph=args.graph, inter_head_flow=True),
    }


def time_step(block: GoHBlock, x: torch.Tensor, fused: bool) -> float:
    if block.attn.router is not None and hasattr(block.attn.router, "fused"):
        block.attn.router.fused = fused
    start = time.perf_counter()
    y, routing = block(x)
    loss = y.float().square().mean() + sum(routing.aux_losses.values(), torch.zeros(()))
    loss.backward()
    return time.perf_counter() - start


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
    x = torch.randn(args.batch, args.seq, args.d_model, requires_grad=True)
    for block in blocks.values():  # warm-up
        for _ in range(3):
            time_step(block, x, not args.no_fused)
    times = {name: [] for name in blocks}
    for _ in range(args.repeats):
        for name, block in blocks.items():
            times[name].append(time_step(block, x, not args.no_fused))

    dense = statistics.median(times["dense MHA"])
    print(f"one block fwd+bwd, d_model={args.d_model}, heads={args.heads}, seq={args.seq}, "
          f"batch={args.batch}, float32, {args.threads} threads, torch {torch.__version__}, "
          f"router path: {'PyG propagate' if args.no_fused else 'fused'}")
    print("| variant | median ms | ratio to dense |\n|---|---|---|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {1000 * median:.1f} | {median / dense:.3f}x |")


if __name__ == "__main__":
    main()
