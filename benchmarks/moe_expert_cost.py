"""Where the sparse expert FFN's dependence on the number of experts E comes from, on a CPU.

bench_moe.py shows E=64 top-2 costing more than E=8 top-2 at the same active parameters. This
script splits that extra cost into its two per-expert parts by timing the expert GEMMs of both
projections (``w_in``: ``[rows, 256] @ [256, 688]`` per expert; ``w_out``: ``[rows, 344] @ [344, 256]``)
three ways, each as forward, input gradient and weight gradient, with the same per-expert loop of
``torch.mm`` into preallocated outputs (so allocation and page faults are out of the picture):

* ``E=8``: 8 experts, ``rows / 8`` rows each;
* ``E=64 cached``: 64 experts whose weights are views of only 8 distinct matrices (8 rotating
  output buffers for the weight gradient). Same GEMM shapes and row counts as E=64, but the
  weights stay in the last-level cache. Its extra time over ``E=8`` is the cost of running
  8x more, 8x smaller GEMMs (packing each expert's weight, per-call overhead, thread split);
* ``E=64``: 64 distinct experts, what the layer does. Its extra time over ``E=64 cached`` is the
  cost of streaming 8x more weight bytes through memory (64 MB of expert weights at E=64).

Both parts are a fixed cost per expert and step, so they shrink relative to the work as the rows
per expert grow; the script runs two token counts to show it. The last line of each token count
sums both projections: the expert GEMMs' share of the E=64 layer's extra time in bench_moe.py.
It ends with the floor of the weight-bytes part: what a step's three plain memory passes over the
expert weights (read for the forward, read for the input gradient, write the weight gradient) cost
without any math.

    python benchmarks/moe_expert_cost.py               # 2048 and 8192 tokens, 2 threads
    python benchmarks/moe_expert_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List

import gohgraph  # noqa: F401  (sets THP_MEM_ALLOC_ENABLE before torch allocates, as in bench_moe)

# isort: split
import torch


def best_ms(fn: Callable[[], None], rounds: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def expert_gemms(rows: int, n_experts: int, weights: List[torch.Tensor], grad_buffers: List[torch.Tensor],
                 d_in: int, d_out: int) -> Dict[str, Callable[[], None]]:
    """The three GEMM passes of one projection over ``n_experts`` equal groups of ``rows``."""
    per_expert = rows // n_experts
    x = torch.randn(n_experts, per_expert, d_in)
    dy = torch.randn(n_experts, per_expert, d_out)
    y, dx = torch.empty_like(dy), torch.empty_like(x)

    def forward() -> None:
        for e in range(n_experts):
            torch.mm(x[e], weights[e], out=y[e])

    def input_grad() -> None:
        for e in range(n_experts):
            torch.mm(dy[e], weights[e].t(), out=dx[e])

    def weight_grad() -> None:
        for e in range(n_experts):
            torch.mm(x[e].t(), dy[e], out=grad_buffers[e])

    return {"forward": forward, "input grad": input_grad, "weight grad": weight_grad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=344, help="expert hidden width (w_in is 2x as wide: SwiGLU)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    projections = {"w_in": (args.d_model, 2 * args.hidden), "w_out": (args.hidden, args.d_model)}
    weight_mb = {n: 3 * args.d_model * args.hidden * n * 4 / 2**20 for n in (8, 64)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, top-{args.top_k}, best of "
          f"{args.rounds}; SwiGLU experts {args.d_model} -> {args.hidden} -> {args.d_model}: "
          f"weights {weight_mb[64]:.0f} MB at E=64, {weight_mb[8]:.1f} MB at E=8")
    print(f"{'tokens':>6s} {'rows/expert':>11s} {'projection':16s} {'pass':12s} {'E=8 ms':>7s} {'E=64 cached':>11s} "
          f"{'E=64 ms':>8s} {'E=64/E=8':>8s}  of the extra: GEMM count / weight bytes")
    for tokens in args.tokens:
        rows = tokens * args.top_k
        totals = {case: 0.0 for case in CASES}
        for projection, (d_in, d_out) in projections.items():
            timed = time_projection(rows, d_in, d_out, args.rounds)
            for pass_name in ("forward", "input grad", "weight grad", "total"):
                times = [sum(timed[c].values()) if pass_name == "total" else timed[c][pass_name] for c in CASES]
                print_row(tokens, rows, f"{projection} [{d_in}x{d_out}]", pass_name, times)
            for case in CASES:
                totals[case] += sum(timed[case].values())
        print_row(tokens, rows, "both", "total", [totals[c] for c in CASES])
    for n_experts in (8, 64):
        weights = torch.randn(n_experts, 3 * args.d_model * args.hidden)
        grad = torch.empty_like(weights)
        read, write = best_ms(weights.sum, args.rounds), best_ms(lambda: grad.fill_(1.0), args.rounds)
        print(f"memory passes, E={n_experts} ({weights.numel() * 4 / 2**20:.1f} MB): read {read:.2f} ms "
              f"({weights.numel() * 4 / read / 1e6:.0f} GB/s), write {write:.2f} ms; 2 reads + 1 write {2 * read + write:.2f} ms")


CASES = ("E=8", "E=64 cached", "E=64")


def time_projection(rows: int, d_in: int, d_out: int, rounds: int) -> Dict[str, Dict[str, float]]:
    """Best ms of each pass (forward, input grad, weight grad) for each of :data:`CASES`."""
    distinct8 = list(torch.randn(8, d_in, d_out).unbind(0))
    distinct64 = list(torch.randn(64, d_in, d_out).unbind(0))
    grads8 = list(torch.empty(8, d_in, d_out).unbind(0))
    grads64 = list(torch.empty(64, d_in, d_out).unbind(0))
    cases = {
        "E=8": (8, distinct8, grads8),
        "E=64 cached": (64, [distinct8[e % 8] for e in range(64)], [grads8[e % 8] for e in range(64)]),
        "E=64": (64, distinct64, grads64),
    }
    return {name: {pass_name: best_ms(fn, rounds) for pass_name, fn in expert_gemms(rows, n, w, g, d_in, d_out).items()}
            for name, (n, w, g) in cases.items()}


def print_row(tokens: int, rows: int, projection: str, pass_name: str, times: List[float]) -> None:
    e8, cached, e64 = times
    extra = e64 - e8
    # the split means nothing when E=64 is not slower (a noisy round)
    split = (f"{100 * (cached - e8) / extra:5.0f}% / {100 * (e64 - cached) / extra:4.0f}%" if extra > 0 else "-")
    print(f"{tokens:6d} {rows // 64:11d} {projection:16s} {pass_name:12s} {e8:7.2f} {cached:11.2f} {e64:8.2f} "
          f"{e64 / e8:7.2f}x  {split}")

if __name__ == "__main__":
    main()
