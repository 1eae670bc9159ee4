"""Speed of the sparse expert FFN (gohgraph.moe) against a dense SwiGLU with the same *active* parameters.

Forward + backward of one feed-forward layer on ``[1, tokens, d_model]`` fp32 inputs, everything
measured in this run: each expert layer is timed beside a dense SwiGLU FFN whose hidden width
gives the same active parameters per token (routed experts a token uses + shared experts + MH-MoE
head/merge layers; the router is overhead, not counted). Timings are interleaved round by round,
so a neighbour's load hits every configuration alike; ratios use the best (minimum) time of each
layer, the usual estimate of its cost on a shared machine, and the medians are printed beside them.

    python benchmarks/bench_moe.py            # d_model=256, 2048 tokens, 2 threads
    python benchmarks/bench_moe.py --quick    # a smoke run
    python benchmarks/bench_moe.py --dtype bfloat16   # bf16 weights and inputs (no autocast)

Targets (issue 3): E=8 top-2 <= 1.3x dense; E=64 <= 1.2x the E=8 time.
Issue 20: gohgraph <= Hugging Face's ``MixtralSparseMoeBlock`` (its ``grouped_mm`` experts, the
fastest of its implementations here) at every E, timed in the same interleaved rounds when
``transformers`` is installed, with the same dense baseline, so both ratios come from one run.

Two environment settings decide the E-dependence on a CPU, and the script prints both:

* OpenMP's wait policy. E=64 runs ~390 small matmuls per step against ~50 for E=8, each its own
  parallel region. With ``OMP_WAIT_POLICY=PASSIVE`` every region pays a thread wake-up, which
  took E=64/E=8 from 1.33x to 2.0x on a quiet machine. The script keeps OpenMP's default
  (spin, then sleep); on an oversubscribed machine, where spinning threads steal their partner's
  core, export ``OMP_WAIT_POLICY=PASSIVE`` and say so beside the numbers.
* ``THP_MEM_ALLOC_ENABLE=1`` (set by ``import gohgraph`` unless exported otherwise): E=64's
  45 MB expert weight gradient is a fresh mapping every backward, and huge pages make it ~5x
  cheaper to fault in.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from gohgraph import GoHConfig  # first: it sets THP_MEM_ALLOC_ENABLE before torch loads
from gohgraph.layers.mlp import SwiGLU
from gohgraph.moe.layer import MoEFeedForward

# isort: split
import torch


def moe_configs(d_model: int, expert_hidden: int):
    """(label, config) pairs; every routed config has top-2 experts of width ``expert_hidden``."""
    common = dict(d_model=d_model, n_heads=8, n_layers=1, top_k_experts=2, expert_hidden=expert_hidden)
    return [
        ("SMoE E=8 top-2", GoHConfig(ffn="moe", n_experts=8, **common)),
        ("SMoE E=32 top-2", GoHConfig(ffn="moe", n_experts=32, **common)),
        ("SMoE E=64 top-2 (fine-grained)", GoHConfig(ffn="moe", n_experts=64, **common)),
        ("SMoE E=8 top-2, C=1.25", GoHConfig(ffn="moe", n_experts=8, capacity_factor=1.25, **common)),
        ("MH-MoE m=4 E=8 top-2", GoHConfig(ffn="mh-moe", n_experts=8, n_subtokens=4, **common)),
        ("GoH-MoE m=4 E=8 top-2", GoHConfig(ffn="graph-moe", n_experts=8, n_subtokens=4, **common)),
    ]


def hf_mixtral_blocks(d_model: int, expert_hidden: int):
    """(label, HF MixtralSparseMoeBlock, n_experts) for E = 8 / 32 / 64 top-2 on the
    ``grouped_mm`` experts path; empty without ``transformers``."""
    try:
        import transformers
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return []
    blocks = []
    for n_experts in (8, 32, 64):
        config = transformers.MixtralConfig(hidden_size=d_model, intermediate_size=expert_hidden,
                                            num_local_experts=n_experts, num_experts_per_tok=2)
        config._experts_implementation = "grouped_mm"
        block = MixtralSparseMoeBlock(config)
        for parameter in block.parameters():  # HF leaves expert weights uninitialised (torch.empty)
            torch.nn.init.normal_(parameter, std=0.02)
        blocks.append((f"HF Mixtral E={n_experts} top-2", block, n_experts))
    return blocks


def active_parameters(cfg: GoHConfig) -> int:
    """Expert-FFN parameters one token uses (router excluded)."""
    d_sub = cfg.d_model // cfg.n_subtokens
    matrices = 3 if cfg.expert_activation == "swiglu" else 2
    per_expert = matrices * d_sub * cfg.expert_hidden_dim
    experts = cfg.n_subtokens * (cfg.top_k_experts + cfg.n_shared_experts) * per_expert
    head_merge = 2 * cfg.d_model * cfg.d_model if cfg.ffn != "moe" else 0
    return experts + head_merge


def fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, returns_routing: bool) -> None:
    y = layer(x)[0] if returns_routing else layer(x)
    y.backward(grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--expert-hidden", type=int, default=344, help="2 x 344 = 688 = the default dense width")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights and inputs of every layer, dense and expert alike")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.rounds = 256, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cases = []  # (label, moe layer, width of the dense FFN with the same active parameters, active)
    dense_by_width = {}
    for label, cfg in moe_configs(args.d_model, args.expert_hidden):
        active = active_parameters(cfg)
        width = round(active / (3 * args.d_model))
        dense_by_width.setdefault(width, SwiGLU(cfg, width))
        cases.append((label, MoEFeedForward(cfg), width, active))

    # HF's blocks have the same shapes and active parameters as the SMoE rows of the same E
    smoe = {cfg.n_experts: label for label, cfg in moe_configs(args.d_model, args.expert_hidden)
            if cfg.ffn == "moe" and cfg.capacity_factor is None}
    hf_cases = [(label, block, next(w for name, _, w, _ in cases if name == smoe[n]), smoe[n])
                for label, block, n in hf_mixtral_blocks(args.d_model, args.expert_hidden)]

    dtype = getattr(torch, args.dtype)
    for layer in [*dense_by_width.values(), *(moe for _, moe, _, _ in cases), *(b for _, b, _, _ in hf_cases)]:
        layer.to(dtype)
    x = torch.randn(1, args.tokens, args.d_model, dtype=dtype, requires_grad=True)
    grad = torch.randn(1, args.tokens, args.d_model, dtype=dtype)
    runs = [(f"dense {width}", layer, False) for width, layer in dense_by_width.items()]
    runs += [(label, layer, True) for label, layer, _, _ in cases]
    runs += [(label, block, False) for label, block, _, _ in hf_cases]
    times = {name: [] for name, _, _ in runs}
    for round_idx in range(args.rounds + 2):  # two warm-up rounds
        for name, layer, returns_routing in runs:
            start = time.perf_counter()
            fwd_bwd(layer, x, grad, returns_routing)
            elapsed = time.perf_counter() - start
            layer.zero_grad(set_to_none=True)
            x.grad = None
            if round_idx >= 2:
                times[name].append(elapsed)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, d_model={args.d_model}, "
          f"tokens={args.tokens}, forward+backward, best and median of {args.rounds} interleaved rounds, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(default)')}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}")
    print(f"{'layer':32s} {'active params':>13s} {'best ms':>8s} {'median ms':>9s} {'vs dense (best)':>16s}")
    for width, layer in dense_by_width.items():
        name = f"dense {width}"
        print(f"{'dense SwiGLU hidden=' + str(width):32s} {3 * args.d_model * width:13,d} "
              f"{1e3 * min(times[name]):8.1f} {1e3 * statistics.median(times[name]):9.1f}")
    for label, _, width, active in cases:
        best, dense_best = min(times[label]), min(times[f"dense {width}"])
        print(f"{label:32s} {active:13,d} {1e3 * best:8.1f} {1e3 * statistics.median(times[label]):9.1f} "
              f"{best / dense_best:8.2f}x of {width}")
    for label, _, width, ours in hf_cases:
        best, dense_best = min(times[label]), min(times[f"dense {width}"])
        print(f"{label:32s} {'':13s} {1e3 * best:8.1f} {1e3 * statistics.median(times[label]):9.1f} "
              f"{best / dense_best:8.2f}x of {width}   gohgraph / HF: {min(times[ours]) / best:.2f}")
    e8 = min(times["SMoE E=8 top-2"])
    print(f"gohgraph: E=32 / E=8 time: {min(times['SMoE E=32 top-2']) / e8:.2f}x   "
          f"E=64 / E=8 time: {min(times['SMoE E=64 top-2 (fine-grained)']) / e8:.2f}x")
    if hf_cases:
        hf8 = min(times["HF Mixtral E=8 top-2"])
        print(f"HF Mixtral: E=32 / E=8 time: {min(times['HF Mixtral E=32 top-2']) / hf8:.2f}x   "
              f"E=64 / E=8 time: {min(times['HF Mixtral E=64 top-2']) / hf8:.2f}x")


if __name__ == "__main__":
    main()
