"""Cost of routing statistics: collect_routing_stats vs the plain forward passes it wraps.

Runs a model over ~10k tokens both ways - bare ``model(ids)`` calls (eval, no_grad: the baseline)
and :func:`gohgraph.analysis.stats.collect.collect_routing_stats` (the same forward passes plus every statistic) -
batch by batch, interleaved and alternating which goes first, so both see the same machine load.
The ratio sums, over batches, the fastest of the repeats of each (on a shared machine noise only
ever adds time, so the minimum is the steadiest estimate); the medians and the time of
``RoutingStats.update`` alone over the same records are printed beside it. The target is a ratio of at most 1.5.

    python benchmarks/bench_stats.py [--tokens 10240] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.analysis.stats.collect import RoutingStats, collect_routing_stats

CONFIGS = {
    "GoH attention, dense FFN": GoHConfig(vocab_size=256, d_model=256, n_layers=4, n_heads=8, n_shared_heads=2,
                                          top_k_heads=4, router="graph", router_rounds=2, head_graph="complete"),
    "GoH attention + graph-MoE": GoHConfig(vocab_size=256, d_model=256, n_layers=4, n_heads=8, n_shared_heads=2,
                                           top_k_heads=4, router="graph", router_rounds=2, ffn="graph-moe",
                                           n_experts=9, n_shared_experts=1, n_subtokens=2, top_k_experts=2,
                                           capacity_factor=1.25),
}


def plain_forward(model: torch.nn.Module, batches: list) -> None:
    with torch.no_grad():
        for ids in batches:
            model(ids)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10240)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    n_batches = max(1, round(args.tokens / (args.batch_size * args.seq_len)))
    batches = [torch.randint(0, 256, (args.batch_size, args.seq_len)) for _ in range(n_batches)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{n_batches} batches x {args.batch_size} x {args.seq_len} = "
          f"{n_batches * args.batch_size * args.seq_len} tokens, "
          f"{args.repeats} interleaved repeats")
    for name, cfg in CONFIGS.items():
        model = GoHTransformer(cfg).eval()
        plain_forward(model, batches)  # warm-up: first calls allocate and pick kernels
        collect_routing_stats(model, batches[:1], progress=False)
        forward_times = [[] for _ in batches]  # [batch][repeat]
        stats_times = [[] for _ in batches]
        for repeat in range(args.repeats):
            for i, ids in enumerate(batches):
                runs = [(forward_times[i], lambda: plain_forward(model, [ids])),
                        (stats_times[i], lambda: collect_routing_stats(model, [ids], progress=False))]
                for times, run in runs[::1 if (repeat + i) % 2 == 0 else -1]:
                    times.append(timed(run))
        with torch.no_grad():
            records = [model(ids).routing for ids in batches]
        update_times = []
        for _ in range(args.repeats):
            stats = RoutingStats(cfg)
            update_times.append(timed(lambda: [stats.update(routing, ids) for routing, ids in zip(records, batches)]))
        forward = sum(min(times) for times in forward_times)
        with_stats = sum(min(times) for times in stats_times)
        forward_median = sum(statistics.median(times) for times in forward_times)
        stats_median = sum(statistics.median(times) for times in stats_times)
        ratio = with_stats / forward
        print(f"{name}: forward {forward:.3f} s (medians {forward_median:.3f}), forward+stats {with_stats:.3f} s "
              f"(medians {stats_median:.3f}), RoutingStats.update alone {min(update_times):.3f} s\n"
              f"    ratio {ratio:.3f}x fastest-vs-fastest ({stats_median / forward_median:.3f}x median-vs-median): "
              f"{'within' if ratio <= 1.5 else 'OVER'} the 1.5x budget; update alone "
              f"{min(update_times) / forward:.3f}x of the forward time")


if __name__ == "__main__":
    main()
