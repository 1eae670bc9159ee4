"""MoSA's sparse heads against dense attention with the same number of heads (issue 29's target: at
k = T/8, the attention step at 4,096 tokens <= 0.5x dense's), forward + backward, interleaved in one
run, with the FLOPs of each counted beside the time.

    python benchmarks/bench_mosa.py                                  # d_model 768, 12 heads, 1k and 4k tokens
    python benchmarks/bench_mosa.py --tables eval                    # the evaluation forward only
    python benchmarks/bench_mosa.py --tables decode                  # greedy decoding after 2k / 8k prompts
    python benchmarks/bench_mosa.py --d-model 64 --heads 4 --tokens 128 --repeats 1   # a smoke run

Rows (one attention layer each, batch 1, training mode):

* ``dense``: ``GoHAttention`` with ``--heads`` dense heads (fused causal SDPA over every token);
* ``MoSA k=T/rho``: the same number of sparse heads alone
  (:class:`gohgraph.layers.mosa.MixtureOfSparseAttention`), each keeping ``T / rho`` tokens.

The **eval** table times an evaluation forward (no gradient, no cache) of the same layers under
MoSA's per-token rule (``mosa_inference="score-threshold"``, its threshold set to the ``1 - 1/rho``
quantile of the scores, so each head keeps about ``T / rho`` tokens as a trained rule does): the
gathered computation (only the kept tokens projected and attended) against the masked one (every
token projected, the dropped keys masked out: what a forward with a key mask and no token mask
runs) and against dense.

The **decode** table times greedy one-token steps (batch 1, ``--decode-layers`` layers, after an
untimed prefill of ``--contexts`` tokens) of a model with ``--heads`` dense heads and as many sparse
heads (``ρ = 8``, the same trained-rule threshold) against the model without sparse heads (``dense``),
each step's sparse heads run by the head-runs kernel (only the heads that keep the new token read the
cache) and, as before session 12, masked (every head over the whole cache, ``masked steps``).

``x dense`` is the time of dense over the time of the row (> 1: faster than dense). FLOPs are
counted with ``torch.utils.flop_counter`` (:mod:`gohgraph.analysis.flops`). Timing on a shared
machine is noise: run it on a quiet one.
"""

from __future__ import annotations

import argparse

import torch

import gohgraph.layers.head_sparse as head_sparse
import gohgraph.layers.mosa as mosa
from gohgraph import GoHConfig, GoHTransformer
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
    parser.add_argument("--tables", nargs="+", choices=["train", "eval", "decode"], default=["train", "eval", "decode"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192], help="decode: prompt lengths")
    parser.add_argument("--decode-layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16, help="decode: timed steps per round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if "train" in args.tables:
        train_table(args)
    if "eval" in args.tables:
        eval_table(args)
    if "decode" in args.tables:
        decode_table(args)


def train_table(args) -> None:
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


def eval_table(args) -> None:
    print("\n### Evaluation forward (no gradient, no cache), the per-token rule keeping about T / rho tokens "
          "per head\n")
    print("| tokens | row | tokens kept per head (mean) | forward ms | x dense | MFLOPs | FLOPs vs dense |")
    print("|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        cfg = GoHConfig(d_model=args.d_model, n_heads=args.heads, n_layers=1, max_seq_len=tokens)
        torch.manual_seed(0)
        x = torch.randn(1, tokens, args.d_model)
        key_mask = torch.ones(1, 1, 1, tokens, dtype=torch.bool)
        dense = build_attention(cfg, 0).eval()
        runs, kept = {"dense": lambda: dense(x)}, {"dense": float(tokens)}
        for sparsity in args.sparsity:
            sparse_cfg = cfg.replace(n_mosa_heads=args.heads, mosa_sparsity=sparsity, mosa_inference="score-threshold")
            module, rotary = MixtureOfSparseAttention(sparse_cfg, 0).eval(), build_query_key_positions(sparse_cfg)
            keep_about(module, x[0], sparsity)
            kept[f"MoSA k~T/{sparsity} gathered"] = float(module(x, rotary)[1].selected.sum(1).float().mean())
            kept[f"MoSA k~T/{sparsity} masked"] = kept[f"MoSA k~T/{sparsity} gathered"]
            runs[f"MoSA k~T/{sparsity} gathered"] = lambda module=module, rotary=rotary: module(x, rotary)
            runs[f"MoSA k~T/{sparsity} masked"] = (lambda module=module, rotary=rotary:
                                                   module(x, rotary, mask=key_mask))
        runs = {name: no_grad(run) for name, run in runs.items()}
        seconds = interleaved_median_seconds(runs, args.repeats, warmup=1)
        flops = {name: count_flops(run)[0] for name, run in runs.items()}
        for name in runs:
            print(f"| {tokens} | {name} | {kept[name]:.0f} | {1e3 * seconds[name]:.1f} "
                  f"| {seconds['dense'] / seconds[name]:.2f}x | {flops[name] / 1e6:.1f} "
                  f"| {flops[name] / flops['dense']:.3f} |", flush=True)


def decode_table(args) -> None:
    print(f"\n### Decode: greedy, batch 1, {args.decode_layers} layers, {args.steps} steps after an untimed prefill; "
          f"{args.heads} dense heads (+ {args.heads} sparse heads, rho 8, for MoSA)\n")
    print("| context | row | tok/s | x dense |")
    print("|---|---|---|---|")
    for context in args.contexts:
        cfg = GoHConfig(vocab_size=256, d_model=args.d_model, n_heads=args.heads, n_layers=args.decode_layers,
                        max_seq_len=context + args.steps + 1)
        torch.manual_seed(0)
        prompt = torch.randint(0, 256, (1, context))
        dense = GoHTransformer(cfg).eval()
        sparse = GoHTransformer(cfg.replace(n_mosa_heads=args.heads, mosa_sparsity=8,
                                            mosa_inference="score-threshold")).eval()
        with torch.no_grad():  # each layer's heads see its normalised input (the embeddings, roughly)
            x = sparse.embed(prompt)[0]
            for block in sparse.blocks:
                keep_about(block.attn.sparse_heads, block.attn_norm(x), 8)
        runs = {"dense": decode_run(dense, prompt, args.steps),
                "MoSA, masked steps": decode_run(sparse, prompt, args.steps, steps_masked=True),
                "MoSA, head-run steps": decode_run(sparse, prompt, args.steps)}
        seconds = interleaved_median_seconds(runs, args.repeats, warmup=1)
        for name in runs:
            print(f"| {context} | {name} | {args.steps / seconds[name]:.1f} | {seconds['dense'] / seconds[name]:.2f}x |",
                  flush=True)


def keep_about(module: MixtureOfSparseAttention, tokens: torch.Tensor, sparsity: int) -> None:
    """Set the score-threshold rule of ``module`` so each head keeps about ``1 / sparsity`` of
    ``tokens [seq, d_model]``, as a trained rule does (a fresh one keeps about half)."""
    with torch.no_grad():
        scores = torch.sigmoid(torch.nn.functional.linear(tokens, module.router))
        module.score_threshold.copy_(scores.quantile(1 - 1 / sparsity, dim=0))


def decode_run(model, prompt: torch.Tensor, steps: int, steps_masked: bool = False):
    """``steps`` greedy one-token steps after ``prompt`` (prefilled once, untimed; every round rewinds
    the cache). ``steps_masked``: the sparse heads' steps run masked over every head (the path a
    call of more than ``DECODE_MAX_QUERIES`` tokens takes), as before session 12."""
    cache = model.new_cache("static", prompt.shape[1] + steps + 1)
    with torch.inference_mode():
        model._set_decoding(True)
        first = model(prompt, cache=cache).logits[:, -1:].argmax(-1)
    context = cache.length()

    def run() -> None:
        mosa.DECODE_MAX_QUERIES = 0 if steps_masked else head_sparse.DECODE_MAX_QUERIES
        cache.lengths = [context] * len(cache.lengths)
        ids = first
        with torch.inference_mode():
            for _ in range(steps):
                ids = model(ids, cache=cache).logits[:, -1:].argmax(-1)
        mosa.DECODE_MAX_QUERIES = head_sparse.DECODE_MAX_QUERIES
    return run


def no_grad(run):
    def wrapped() -> None:
        with torch.no_grad():
            run()
    return wrapped


if __name__ == "__main__":
    main()
