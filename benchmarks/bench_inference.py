"""Generation: decode speed against dense and against Hugging Face Llama, the KV cache against full
recompute, and KV-cache memory per attention kind, in one run.

    python benchmarks/bench_inference.py                      # all three tables (a few minutes on 2 cores)
    python benchmarks/bench_inference.py --tables decode --repeats 5

1. **Decode** (greedy, batch 1, by default d_model 128, 4 layers, 8 heads, 256 new tokens): tokens/s of
   Hugging Face ``LlamaForCausalLM.generate`` of the same shape (an outside anchor, when
   ``transformers`` is installed), gohgraph dense, MoH and GoH, each eager and with
   ``generate(compile=True)`` (the whole one-token step through one ``torch.compile``'d graph,
   :mod:`gohgraph.models.compiled_decode`). Ratios are to gohgraph dense eager, measured interleaved
   in the same run (median of ``--repeats``). Compiling is timed apart, before: the first compiled
   generation of each model (compile included) is printed in its own table, and the tok/s rows
   reuse the graph it built. The dense model converted from the HF one must produce HF's tokens.
2. **Cache vs recompute**: ``use_cache=True`` against ``use_cache=False`` at batch 1 and 8, same
   tokens required.
3. **KV-cache bytes** per token per layer (float32) for MHA / GQA / MQA / MLA / a sliding window,
   measured from the cache after a 4,096-token prefill and printed beside the formulas
   (MHA ``2 H d_h``, GQA ``2 g d_h``, MQA ``2 d_h``, MLA ``kv_lora_rank + d_R``, window: MHA's for
   ``W - 1`` positions whatever the length), with the cache's total at 4k context.

At batch 1 a cached step is one token per layer: it is bound by the number of small ops per layer
(the routers add some), not by arithmetic.
"""

from __future__ import annotations

import argparse
import time

import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.analysis.timing import interleaved_median_seconds
from gohgraph.models.generation import make_decode_cache

HEADS, VOCAB = 8, 256
ROUTED = dict(n_shared_heads=2, top_k_heads=4)


def decode_models(args, max_len: int) -> dict:
    base = dict(vocab_size=VOCAB, d_model=args.d_model, n_layers=args.layers, n_heads=HEADS, max_seq_len=max_len)
    return {
        "dense": GoHConfig(**base),
        "MoH": GoHConfig(**base, router="linear", **ROUTED),
        "GoH": GoHConfig(**base, router="graph", router_rounds=2, inter_head_flow=True, **ROUTED),
    }


def hugging_face_llama(cfg: GoHConfig):
    """LlamaForCausalLM of ``cfg``'s shape, or None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # visible weights: logits far apart, so greedy tokens do not hinge on rounding
        for name, param in model.named_parameters():
            gain = param.dim() == 1 and name.endswith("weight")
            param.copy_(1.0 + 0.1 * torch.randn_like(param) if gain else 0.15 * torch.randn_like(param))
    model.generation_config.eos_token_id = None  # every run generates all its tokens
    return model


def decode_table(args) -> None:
    configs = decode_models(args, args.prompt + args.new)
    torch.manual_seed(0)
    models = {name: GoHTransformer(cfg).eval() for name, cfg in configs.items()}
    prompt = torch.randint(0, VOCAB, (1, args.prompt))
    runs, outputs = {}, {}
    hf_model = hugging_face_llama(configs["dense"])
    if hf_model is not None:
        from gohgraph.interop.convert import convert_hf_model

        models["dense (from HF)"] = convert_hf_model(hf_model, router="dense").eval()

        def hf_run():
            with torch.no_grad():
                # an explicit mask: HF would otherwise take prompt tokens equal to pad_token_id for padding
                outputs["HF Llama"] = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                        max_new_tokens=args.new, do_sample=False, pad_token_id=0)
        runs["HF Llama"] = hf_run
    compile_seconds = {}
    for name, model in models.items():
        for compiled in (False, True):
            if compiled and (args.no_compile or name == "dense (from HF)"):
                continue
            key = f"{name} compiled" if compiled else name

            def run(model=model, compiled=compiled, key=key):
                outputs[key] = model.generate(prompt, max_new_tokens=args.new, temperature=0.0, compile=compiled)
            if compiled:  # the first call compiles: timed here, apart from the tok/s
                start = time.perf_counter()
                run()
                compile_seconds[key] = time.perf_counter() - start
            runs[key] = run
    seconds = interleaved_median_seconds(runs, args.repeats, warmup=1)
    print(f"\n### Decode: greedy, batch 1, prompt {args.prompt}, {args.new} new tokens, d_model {args.d_model}, "
          f"{args.layers} layers, {HEADS} heads (MoH/GoH: 2 shared + top-4), float32, {args.threads} threads, "
          f"torch {torch.__version__}; median of {args.repeats}\n")
    print("| model | tok/s | vs gohgraph dense | same tokens as |")
    print("|---|---|---|---|")
    dense = seconds["dense"]
    for key, secs in seconds.items():
        same = ""
        if key == "dense (from HF)" and "HF Llama" in outputs:
            same = "HF Llama: " + ("yes" if torch.equal(outputs[key], outputs["HF Llama"]) else "NO")
        elif key.endswith(" compiled"):
            same = "eager: " + ("yes" if torch.equal(outputs[key], outputs[key[:-len(' compiled')]]) else "NO")
        print(f"| {key} | {args.new / secs:.0f} | {dense / secs:.2f}x | {same} |")
    if compile_seconds:
        print(f"\n### Compiling: the first compiled generation ({args.new} new tokens), compile included\n")
        print("| model | first call (s) |")
        print("|---|---|")
        for key, secs in compile_seconds.items():
            print(f"| {key} | {secs:.1f} |")


def cache_table(args) -> None:
    torch.manual_seed(0)
    models = {name: GoHTransformer(cfg).eval() for name, cfg in decode_models(args, args.prompt + 512).items()}
    print(f"\n### KV cache against recompute (greedy, prompt {args.prompt}); median of {args.repeats}\n")
    print("| variant | batch | new tokens | KV cache tok/s | recompute tok/s | cache speed-up | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for batch, new in [(1, args.new), (8, args.new)]:
        prompt = torch.randint(0, VOCAB, (batch, args.prompt))
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


def memory_table(args) -> None:
    context, head_dim, window, layers = 4096, args.d_model // HEADS, 512, args.layers
    base = dict(vocab_size=VOCAB, d_model=args.d_model, n_layers=layers, n_heads=HEADS, max_seq_len=context)
    kinds = {
        "MHA": (GoHConfig(**base), f"2 H d_h = 2*{HEADS}*{head_dim}", 2 * HEADS * head_dim),
        "GQA (g=2)": (GoHConfig(**base, n_kv_heads=2), f"2 g d_h = 2*2*{head_dim}", 2 * 2 * head_dim),
        "MQA": (GoHConfig(**base, n_kv_heads=1), f"2 d_h = 2*{head_dim}", 2 * head_dim),
        "MLA (r=32, d_R=8)": (GoHConfig(**base, attention="mla", kv_lora_rank=32, qk_rope_head_dim=8),
                              "kv_lora_rank + d_R = 32 + 8", 32 + 8),
        f"sliding window W={window}": (GoHConfig(**base, sliding_window=window),
                                       f"2 H d_h for W-1 = {window - 1} positions", 2 * HEADS * head_dim),
    }
    print(f"\n### KV cache after a {context}-token prefill, float32, d_model {args.d_model}, {layers} layers, "
          f"{HEADS} heads\n")
    print("| attention | formula (numbers / token / layer) | formula | measured bytes / token / layer "
          f"| cache at {context} tokens (all layers) |")
    print("|---|---|---|---|---|")
    ids = torch.randint(0, VOCAB, (1, context))
    for name, (cfg, formula, numbers) in kinds.items():
        torch.manual_seed(0)
        model = GoHTransformer(cfg).eval()
        cache = make_decode_cache(cfg, "auto", context)
        with torch.inference_mode():
            model(ids, cache=cache)
        total = sum(t.nbytes for t in [*cache.keys, *cache.values] if t is not None)
        stored = cache.stored() if hasattr(cache, "stored") else context
        per_token = total / (layers * stored)
        print(f"| {name} | {formula} | {numbers * 4} B | {per_token:.0f} B | {total / 2 ** 20:.2f} MiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", choices=["decode", "cache", "memory"],
                        default=["decode", "cache", "memory"])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows (compiling takes minutes per model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for table in args.tables:
        {"decode": decode_table, "cache": cache_table, "memory": memory_table}[table](args)


if __name__ == "__main__":
    main()
