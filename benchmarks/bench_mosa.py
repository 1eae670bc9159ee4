"""MoSA's sparse heads against dense attention with the same number of heads (issue 29's target: at
k = T/8, the attention step at 4,096 tokens <= 0.5x dense's), forward + backward, interleaved in one
run, with the FLOPs of each counted beside the time.

    python benchmarks/bench_mosa.py                                  # d_model 768, 12 heads, 1k and 4k tokens
    python benchmarks/bench_mosa.py --d-model 64 --heads 4 --tokens 128 --repeats 1   # a smoke run

Rows (one attention layer each, batch 1, training mode):

* ``dense``: ``GoHAttention`` with ``--heads`` dense heads (fused causal SDPA over every token);
* ``MoSA k=T/rho``: the same number of sparse heads alone
  (:class:`gohgraph.layers.mosa.MixtureOfSparseAttention`), each keeping ``T / rho`` tokens.

``x dense`` is the time of dense over the time of the row (> 1: faster than dense). FLOPs are
counted with ``torch.utils.flop_counter`` (:mod:`gohgraph.analysis.flops`). Timing on a shared
machine is noise: run it on a quiet one.
"""

from __future__ import annotations

import argparse

import torch

from gohgraph import GoHConfig
from gohgraph.analysis.flops import count_flops
from gohgraph.analysis.timing import interleaved_median_seconds
from gohgraph.layers.mosa import MixtureOfSparseAttention, mosa_tokens_per_head
from gohgraph.layers.positions import build_query_key_positions
from gohgraph.models.block import build_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--sparsity", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| tokens | row | k per head | fwd+bwd ms | x dense | MFLOPs | FLOPs vs dense |")
    print("|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        cfg = GoHConfig(d_model=args.d_model, n_heads=args.heads, n_layers=1, max_seq_len=tokens)
        torch.manual_seed(0)
        x = torch.randn(1, tokens, args.d_model)
        rows = {"dense": (build_attention(cfg, 0).train(), None, tokens)}
        for sparsity in args.sparsity:
            sparse_cfg = cfg.replace(n_mosa_heads=args.heads, mosa_sparsity=sparsity)
            rows[f"MoSA k=T/{sparsity}"] = (MixtureOfSparseAttention(sparse_cfg, 0).train(),
                                            build_query_key_positions(sparse_cfg),
                                            mosa_tokens_per_head(tokens, sparsity))

        def step(module, rotary):
            def run() -> None:
                out = module(x) if rotary is None else module(x, rotary)
                out[0].sum().backward()
            return run

        runs = {name: step(module, rotary) for name, (module, rotary, _) in rows.items()}
        seconds = interleaved_median_seconds(runs, args.repeats, warmup=1)
        flops = {name: count_flops(run)[0] for name, run in runs.items()}
        for name, (_, _, kept) in rows.items():
            print(f"| {tokens} | {name} | {kept} | {1e3 * seconds[name]:.1f} | {seconds['dense'] / seconds[name]:.2f}x "
                  f"| {flops[name] / 1e6:.1f} | {flops[name] / flops['dense']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
