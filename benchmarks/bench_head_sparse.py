"""Routing that skips work (docs/skipping-work.md), at the shapes users run: head-sparse against masked
execution, against dense and against Hugging Face Llama, in one interleaved run.

    python benchmarks/bench_head_sparse.py                       # everything (about 30 min on 2 cores)
    python benchmarks/bench_head_sparse.py --tables decode --contexts 2048
    python benchmarks/bench_head_sparse.py --d-model 128 --heads 8 --contexts 256 --train-tokens 256  # quick

Models (d_model 768, 12 heads of 64 by default): dense; MoH and GoH with 4 shared + top-4 of 8
routed heads (8 of 12 active) and with 2 shared + top-2 of 10 (4 of 12 active). Each routed model
runs twice from the same weights: ``head_execution="sparse"`` (head-sparse whatever the size; the
rows from which the thresholds of ``"auto"``, :func:`gohgraph.layers.head_sparse.picks_head_sparse`,
are chosen) and ``"masked"`` (every head computed, the reference and what gohgraph did before). Hugging Face ``LlamaForCausalLM`` of the dense shape is the
outside anchor.

1. **decode**: greedy, batch 1 after 2k- and 8k-token prompts, and batch 4 after 2k. Each model
   prefills once, untimed; every round rewinds its cache to the prompt and times ``--steps``
   one-token steps; median over ``--repeats`` interleaved rounds.
   **compiled**: the same at batch 1 through ``generate(compile=True)``'s whole compiled step
   (inside it the routed rows' ``"sparse"`` gathers the active heads by index), after an untimed
   round that compiles each row's graph.
2. **train**: forward + backward of a ``--train-layers``-layer model on one sequence of 1,024 /
   2,048 / 4,096 tokens (loss with the routing losses), median of interleaved rounds.
3. **mor**: Mixture-of-Recursions (3 recursions of the ``--train-layers`` blocks, expert-choice with
   capacities 1, 2/3, 1/3, and token-choice), forward + backward on ``max(--train-tokens)`` tokens,
   gathered (``recursion_execution="auto"``) against masked, beside dense of the same blocks.
4. **flops**: train FLOPs / token and decode FLOPs / token, counted with
   ``torch.utils.flop_counter.FlopCounterMode`` on the real step (:mod:`gohgraph.analysis.flops`
   registers CPU SDPA and grouped-mm formulas), next to the time ratios.

Ratios are to gohgraph dense measured in the same rounds (``x dense``: time of dense / time of the
row, so > 1 is faster than dense).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.analysis.flops import count_flops
from gohgraph.models.compiled_decode import CompiledDecoder, compiled_step
from gohgraph.models.generation import make_decode_cache

VOCAB = 256


def model_configs(args, n_layers: int, max_len: int) -> Dict[str, GoHConfig]:
    base = dict(vocab_size=VOCAB, d_model=args.d_model, n_layers=n_layers, n_heads=args.heads, max_seq_len=max_len)
    heads = args.heads
    eight, four = dict(n_shared_heads=heads // 3, top_k_heads=heads // 3), dict(n_shared_heads=heads // 6,
                                                                               top_k_heads=heads // 6)
    configs = {"dense": GoHConfig(**base)}
    for label, active in ((f"{2 * heads // 3}/{heads}", eight), (f"{heads // 3}/{heads}", four)):
        configs[f"MoH {label}"] = GoHConfig(**base, router="linear", **active)
        configs[f"GoH {label}"] = GoHConfig(**base, router="graph", router_rounds=2, inter_head_flow=True, **active)
    return configs


def hugging_face_llama(cfg: GoHConfig):
    try:
        import transformers
    except ImportError:
        return None
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(hf_config)


def interleaved(runs: Dict[str, Callable[[], float]], repeats: int) -> Dict[str, float]:
    """Median of what each run returns (its own timed seconds), rounds interleaved."""
    samples: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(run())
    return {name: statistics.median(values) for name, values in samples.items()}


def rows(configs: Dict[str, GoHConfig]):
    """(row name, config name, execution mode) of every timed row."""
    out = [("dense", "dense", "masked")]
    for name in configs:
        if name != "dense":
            out += [(f"{name} sparse", name, "sparse"), (f"{name} masked", name, "masked")]
    return out


# ---------------------------------------------------------------------------------------- decode
def decode_table(args) -> None:
    configs = model_configs(args, args.decode_layers, max(args.contexts) + args.steps + 8)
    torch.manual_seed(0)
    models = {name: GoHTransformer(cfg).eval() for name, cfg in configs.items()}
    hf = hugging_face_llama(configs["dense"]) if not args.no_hf else None
    settings = [(1, context) for context in args.contexts] + [(args.batch, min(args.contexts))]
    for batch, context in settings:
        prompt = torch.randint(0, VOCAB, (batch, context))
        runs = prefilled_runs(models, configs, prompt, args.steps, compiled=False)
        if hf is not None:
            runs["HF Llama"] = hf_decode_run(hf, prompt, args.steps)
        seconds = interleaved(runs, args.repeats)
        print(f"\n### Decode: greedy, batch {batch} after a {context}-token prompt, {args.steps} steps timed "
              f"after an untimed prefill; d_model {args.d_model}, {args.decode_layers} layers, {args.heads} heads, "
              f"float32, {torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.repeats}\n")
        print("| model | tok/s | x dense |")
        print("|---|---|---|")
        for row, secs in seconds.items():
            print(f"| {row} | {batch * args.steps / secs:.1f} | {seconds['dense'] / secs:.2f}x |")
        for model in models.values():
            model._set_decoding(False)


def compiled_table(args) -> None:
    """The decode table through ``generate(compile=True)``'s whole compiled step (CompiledDecoder):
    one graph per model and execution mode, compiled in an untimed warm-up round."""
    configs = model_configs(args, args.decode_layers, max(args.contexts) + args.steps + 8)
    # every model's graphs (one per execution mode and context) share decode_step's code object,
    # and past Dynamo's limit (8) a step would silently run eagerly
    torch._dynamo.config.recompile_limit = 8 * len(configs) * len(args.contexts)
    torch.manual_seed(0)
    models = {name: GoHTransformer(cfg).eval() for name, cfg in configs.items()}
    for context in args.contexts:
        runs = prefilled_runs(models, configs, torch.randint(0, VOCAB, (1, context)), args.steps, compiled=True)
        compile_seconds: Dict[str, float] = {}
        for row, run in runs.items():  # compiles every graph, untimed
            start = time.perf_counter()
            run()
            compile_seconds[row] = time.perf_counter() - start
        seconds = interleaved(runs, args.repeats)
        print(f"\n### Compiled decode (generate(compile=True)'s whole step): greedy, batch 1 after a {context}-token "
              f"prompt, {args.steps} steps timed after an untimed prefill and an untimed compiling round; "
              f"d_model {args.d_model}, {args.decode_layers} layers, {args.heads} heads, float32, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.repeats}\n")
        print("| model | tok/s | x dense compiled | first round, compile included (s) |")
        print("|---|---|---|---|")
        for row, secs in seconds.items():
            print(f"| {row} | {args.steps / secs:.1f} | {seconds['dense compiled'] / secs:.2f}x | {compile_seconds[row]:.1f} |")
        for model in models.values():
            model._set_decoding(False)


def prefilled_runs(models, configs, prompt: torch.Tensor, steps: int, compiled: bool) -> Dict[str, Callable[[], float]]:
    """Every row (:func:`rows`) as a timed run of ``steps`` one-token steps after ``prompt``, which
    each model prefills once, untimed, into its own static cache (rows named "... compiled" when
    ``compiled``)."""
    runs: Dict[str, Callable[[], float]] = {}
    for name, model in models.items():
        cache = make_decode_cache(model.config, "static", prompt.shape[1] + steps + 1)
        with torch.inference_mode():
            model._set_decoding(True)
            first = model(prompt, cache=cache).logits[:, -1:].argmax(-1)
        for row, config_name, mode in rows(configs):
            if config_name == name:
                runs[f"{row} compiled" if compiled else row] = decode_run(model, cache, first, steps, mode, compiled)
    return runs


def decode_run(model, cache, first, steps: int, mode: str, compiled: bool) -> Callable[[], float]:
    """Seconds of ``steps`` greedy steps from the prompt in ``cache`` (rewound every round), eager or
    through the compiled whole step."""
    context = cache.length()

    def run() -> float:
        model.set_execution(head_execution=mode)
        cache.lengths = [context] * len(cache.lengths)  # rewind to the prompt
        if compiled:
            decoder = CompiledDecoder(model, cache, None, compiled_step(model))
            step = lambda ids: decoder(ids).argmax(-1, keepdim=True)  # noqa: E731
        else:
            step = lambda ids: model(ids, cache=cache).logits[:, -1:].argmax(-1)  # noqa: E731
        ids = first
        with torch.inference_mode():
            start = time.perf_counter()
            for _ in range(steps):
                ids = step(ids)
            return time.perf_counter() - start
    return run


def hf_decode_run(hf, prompt, steps: int) -> Callable[[], float]:
    from transformers import DynamicCache
    hf.eval()
    cache = DynamicCache(config=hf.config)
    with torch.inference_mode():
        first = hf(prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    context = prompt.shape[1]

    def run() -> float:
        extra = cache.get_seq_length() - context
        if extra:
            cache.crop(-extra)
        ids = first
        with torch.inference_mode():
            start = time.perf_counter()
            for _ in range(steps):
                ids = hf(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            return time.perf_counter() - start
    return run


# ----------------------------------------------------------------------------------------- train
def train_table(args) -> None:
    for tokens in args.train_tokens:
        configs = model_configs(args, args.train_layers, tokens)
        configs = {name: cfg for name, cfg in configs.items() if name == "dense" or not name.endswith(f"{args.heads // 3}/{args.heads}")}
        torch.manual_seed(0)
        models = {name: GoHTransformer(cfg).train() for name, cfg in configs.items()}
        ids = torch.randint(0, VOCAB, (1, tokens))
        runs = {}
        for row, name, mode in rows(configs):
            runs[row] = train_run(models[name], ids, head_execution=mode)
        hf = hugging_face_llama(configs["dense"]) if not args.no_hf else None
        if hf is not None:
            hf.train()
            runs["HF Llama"] = hf_train_run(hf, ids)
        for run in runs.values():  # warm-up
            run()
        seconds = interleaved(runs, args.repeats)
        print(f"\n### Training step (forward + backward), one sequence of {tokens} tokens, {args.train_layers} layers, "
              f"d_model {args.d_model}, {args.heads} heads, float32, {torch.get_num_threads()} threads; "
              f"median of {args.repeats}\n")
        print("| model | step (s) | x dense (time of dense / time) |")
        print("|---|---|---|")
        for row, secs in seconds.items():
            print(f"| {row} | {secs:.3f} | {seconds['dense'] / secs:.2f}x |")


def train_run(model, ids, **execution: str) -> Callable[[], float]:
    """Seconds of one forward + backward in the execution mode given (``head_execution=`` or
    ``recursion_execution=``, as ``set_execution`` takes them)."""
    def run() -> float:
        model.set_execution(**execution)
        start = time.perf_counter()
        out = model(ids, labels=ids)
        out.loss.backward()
        seconds = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return seconds
    return run


def hf_train_run(hf, ids) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        hf(ids, labels=ids).loss.backward()
        seconds = time.perf_counter() - start
        hf.zero_grad(set_to_none=True)
        return seconds
    return run


# ------------------------------------------------------------------------------------------- mor
def mor_table(args) -> None:
    tokens = max(args.train_tokens)
    base = dict(vocab_size=VOCAB, d_model=args.d_model, n_layers=args.train_layers, n_heads=args.heads,
                max_seq_len=tokens)
    configs = {"dense": GoHConfig(**base)}
    for label, extra in (("expert-choice, recursion KV", {}), ("expert-choice, shared KV", dict(recursion_kv="shared")),
                         ("token-choice, recursion KV", dict(recursion_router="token-choice"))):
        configs[f"MoR {label}"] = GoHConfig(**base, recursion="mor", max_recursions=3, **extra)
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, tokens))
    runs, kept = {}, {}
    for name, cfg in configs.items():
        model = GoHTransformer(cfg).train()
        modes = [("", "masked")] if name == "dense" else [(" gathered", "auto"), (" masked", "masked")]
        for suffix, mode in modes:
            runs[name + suffix] = train_run(model, ids, recursion_execution=mode)
        if name != "dense":
            with torch.no_grad():
                kept[name] = model(ids).recursion.selected.float().mean(dim=(1, 2)).tolist()
    for run in runs.values():
        run()
    seconds = interleaved(runs, args.repeats)
    print(f"\n### Mixture-of-Recursions, 3 recursions of {args.train_layers} shared blocks, forward + backward on "
          f"{tokens} tokens, d_model {args.d_model}, float32, {torch.get_num_threads()} threads; median of "
          f"{args.repeats}\n")
    print("| model | step (s) | x dense | gathered / masked time | share of tokens per recursion |")
    print("|---|---|---|---|---|")
    for row, secs in seconds.items():
        name = row.rsplit(" ", 1)[0] if row != "dense" else row
        ratio = f"{secs / seconds[name + ' masked']:.2f}" if row.endswith("gathered") else ""
        share = " / ".join(f"{k:.2f}" for k in kept.get(name, []))
        print(f"| {row} | {secs:.3f} | {seconds['dense'] / secs:.2f}x | {ratio} | {share} |")


# ----------------------------------------------------------------------------------------- flops
def flops_table(args) -> None:
    tokens, context = max(args.train_tokens), max(args.contexts)
    print(f"\n### FLOPs counted by FlopCounterMode: train step on {tokens} tokens ({args.train_layers} layers), "
          f"one decode step after {context} tokens ({args.decode_layers} layers)\n")
    print("| model | train GFLOPs / token | x dense | attention-core share of it | decode MFLOPs / token | x dense |")
    print("|---|---|---|---|---|---|")
    train_configs = model_configs(args, args.train_layers, tokens)
    decode_configs = model_configs(args, args.decode_layers, context + 1)
    results = {}
    for row, name, mode in rows(train_configs):
        torch.manual_seed(0)
        model = GoHTransformer(train_configs[name]).train()
        model.set_execution(head_execution=mode)
        ids = torch.randint(0, VOCAB, (1, tokens))
        train, per_op = count_flops(lambda: model(ids, labels=ids).loss.backward())
        core = sum(n for op, n in per_op.items() if "scaled_dot_product" in op)
        torch.manual_seed(0)
        model = GoHTransformer(decode_configs[name]).eval()
        model.set_execution(head_execution=mode)
        cache = make_decode_cache(model.config, "static", context + 1)
        with torch.inference_mode():
            model._set_decoding(True)
            model(torch.randint(0, VOCAB, (1, context)), cache=cache)
            decode, _ = count_flops(lambda: model(torch.zeros(1, 1, dtype=torch.long), cache=cache))
        results[row] = (train / tokens, core / train, decode)
    dense_train, _, dense_decode = results["dense"]
    for row, (train, core, decode) in results.items():
        print(f"| {row} | {train / 1e9:.3f} | {train / dense_train:.3f} | {core:.2f} | {decode / 1e6:.1f} "
              f"| {decode / dense_decode:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", choices=["decode", "compiled", "train", "mor", "flops"],
                        default=["decode", "compiled", "train", "mor", "flops"])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--decode-layers", type=int, default=4)
    parser.add_argument("--train-layers", type=int, default=2)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--batch", type=int, default=4, help="batch of the last decode table (after the shortest context)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--train-tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-hf", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for table in args.tables:
        {"decode": decode_table, "compiled": compiled_table, "train": train_table, "mor": mor_table,
         "flops": flops_table}[table](args)


if __name__ == "__main__":
    main()
