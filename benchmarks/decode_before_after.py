"""Decode speed of dense, MoH and GoH of one checkout, to compare two commits with the same script.

    PYTHONPATH=/path/to/old/checkout python benchmarks/decode_before_after.py
    PYTHONPATH=. python benchmarks/decode_before_after.py

Greedy ``generate`` at batch 1 (d_model 128, 4 layers, 8 heads; MoH/GoH: 2 shared + top-4), median
of ``--repeats``; prints which gohgraph it imported, tokens/s and the ratio to dense. It uses only
the API every version has, so it runs unchanged on older commits.
"""

import argparse
import statistics
import time

import torch

import gohgraph
from gohgraph import GoHConfig, GoHTransformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = dict(vocab_size=256, d_model=args.d_model, n_layers=4, n_heads=8, max_seq_len=16 + args.new)
    routed = dict(n_shared_heads=2, top_k_heads=4)
    configs = {"dense": GoHConfig(**base), "MoH": GoHConfig(**base, router="linear", **routed),
               "GoH": GoHConfig(**base, router="graph", router_rounds=2, inter_head_flow=True, **routed)}
    torch.manual_seed(0)
    models = {name: GoHTransformer(cfg).eval() for name, cfg in configs.items()}
    prompt = torch.randint(0, 256, (1, 16))
    times = {name: [] for name in models}
    for model in models.values():  # warm-up
        model.generate(prompt, max_new_tokens=args.new, temperature=0.0)
    for _ in range(args.repeats):  # interleaved
        for name, model in models.items():
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=args.new, temperature=0.0)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"gohgraph from {gohgraph.__file__}")
    for name in models:
        print(f"{name}: {args.new / median[name]:.0f} tok/s, {median['dense'] / median[name]:.2f}x dense")


if __name__ == "__main__":
    main()
