"""SwitchHead's attention layer against dense attention at (about) the same attention parameters
(issue 29's targets at d_model 768, 1,024 tokens: attention FLOPs per token <= 0.5x dense, the
attention layer's training step <= 0.7x dense's), forward + backward, interleaved in one run, with
the FLOPs and parameters of each counted beside the time.

    python benchmarks/bench_switchhead.py                       # d_model 768: 12 dense heads of 64
    python benchmarks/bench_switchhead.py --d-model 64 --tokens 64 --repeats 1   # a smoke run

Rows (one attention layer each, batch 1, training mode, RoPE):

* ``dense``: ``--heads`` heads of ``d_model / heads`` (every head's Q, K, V and O);
* ``SwitchHead h x E top-k``: ``h`` heads of the same width (``attention_head_dim``), each with ``E``
  value and ``E`` output experts of which ``k`` run per token (Csordás et al. 2024): with
  ``h (2 + 2E) = 4 * heads`` the layer holds dense's attention parameters (+ the two small
  selection routers);
* ``SwitchHead heads x E top-k``: as many heads as dense, for reference (more parameters, no saving).

``x dense`` is the time of dense over the time of the row (> 1: faster than dense).
Timing on a shared machine is noise: run it on a quiet one.
"""

from __future__ import annotations

import argparse

import torch

from gohgraph import GoHConfig
from gohgraph.analysis.flops import count_flops
from gohgraph.analysis.timing import interleaved_median_seconds
from gohgraph.models.block import build_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    width = args.d_model // args.heads
    dense = GoHConfig(d_model=args.d_model, n_heads=args.heads, n_layers=1, max_seq_len=args.tokens)
    few_heads = args.heads // 3  # with 5 experts: h (2 + 2 * 5) = 4 * heads
    configs = {"dense": dense,
               f"SwitchHead {few_heads} x 5 top-2": dense.replace(n_heads=few_heads, attention_head_dim=width,
                                                                 n_attention_experts=5, top_k_attention_experts=2),
               f"SwitchHead {args.heads} x 4 top-2": dense.replace(n_attention_experts=4, top_k_attention_experts=2)}
    torch.manual_seed(0)
    x = torch.randn(1, args.tokens, args.d_model)
    layers = {name: build_attention(cfg, 0).train() for name, cfg in configs.items()}

    def step(module):
        def run() -> None:
            module(x)[0].sum().backward()
        return run

    runs = {name: step(module) for name, module in layers.items()}
    seconds = interleaved_median_seconds(runs, args.repeats, warmup=1)
    flops = {name: count_flops(run)[0] for name, run in runs.items()}
    params = {name: sum(p.numel() for p in module.parameters()) for name, module in layers.items()}
    print(f"d_model {args.d_model}, {args.tokens} tokens, batch 1, float32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; median of {args.repeats} interleaved fwd+bwd steps\n")
    print("| row | attention params | vs dense | fwd+bwd ms | time vs dense | MFLOPs / token | FLOPs vs dense |")
    print("|---|---|---|---|---|---|---|")
    for name in layers:
        print(f"| {name} | {params[name]:,} | {params[name] / params['dense']:.3f} | {1e3 * seconds[name]:.1f} "
              f"| {seconds[name] / seconds['dense']:.2f}x | {flops[name] / args.tokens / 1e6:.2f} "
              f"| {flops[name] / flops['dense']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
