"""Generation speed: ``GoHTransformer.generate`` with the KV cache against full recompute
(``use_cache=False``) for dense MHA, MoH and GoH, at 128 and 512 new tokens, in one run.

Greedy decoding (temperature 0) from the same prompt, so cached and recomputed generation must
produce the same tokens; the script checks it and prints tokens/s and the speed-up of the cache.
Runs are interleaved (cache, recompute, next variant, ...) and the median of ``--repeats`` is kept.

    python benchmarks/bench_inference.py                  # d_model=128, 4 layers, 8 heads, batch 1 and 8
    python benchmarks/bench_inference.py --batch 1 --repeats 1      # quicker

At batch 1 a cached step is one token per layer, so it is bound by the number of small ops per
layer (the graph router has many) rather than by arithmetic; larger batches amortise that.
"""

from __future__ import annotations

import argparse

import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.analysis.timing import interleaved_median_seconds


def variants(args) -> dict:
    base = dict(d_model=args.d_model, n_layers=args.layers, n_heads=8, max_seq_len=args.prompt + max(args.new))
    routed = dict(n_shared_heads=2, top_k_heads=4)
    return {
        "dense": GoHConfig(**base),
        "MoH": GoHConfig(**base, router="linear", **routed),
        "GoH": GoHConfig(**base, router="graph", router_rounds=2, inter_head_flow=True, **routed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {name: GoHTransformer(cfg).eval() for name, cfg in variants(args).items()}
    print(f"generate, greedy, prompt {args.prompt} tokens, d_model={args.d_model}, "
          f"{args.layers} layers, 8 heads (MoH/GoH: 2 shared + top-4), float32, {args.threads} threads, "
          f"torch {torch.__version__}; median of {args.repeats}")
    print("| variant | batch | new tokens | KV cache tok/s | recompute tok/s | cache speed-up | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for batch, new in [(batch, new) for batch in args.batch for new in args.new]:
        prompt = torch.randint(0, 256, (batch, args.prompt))
        runs, outputs = {}, {}
        for name, model in models.items():
            for cache in (True, False):
                def run(model=model, cache=cache, key=(name, cache)):
                    outputs[key] = model.generate(prompt, max_new_tokens=new, temperature=0.0, use_cache=cache)
                runs[(name, cache)] = run
        seconds = interleaved_median_seconds(runs, args.repeats, warmup=0)
        for name in models:
            cached, recomputed = seconds[(name, True)], seconds[(name, False)]
            same = torch.equal(outputs[(name, True)], outputs[(name, False)])
            print(f"| {name} | {batch} | {new} | {batch * new / cached:.0f} | {batch * new / recomputed:.0f} "
                  f"| {recomputed / cached:.1f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
