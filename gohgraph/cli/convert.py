"""``gohgraph convert``: a local Hugging Face Llama / GPT-2 / Mixtral / Qwen2-MoE / BERT checkpoint -> a graph-routed GoH checkpoint.

Thin: parses arguments, calls :func:`gohgraph.interop.convert.convert_hf_model`, saves the result. The
saved model has ``dense_blend = 1`` (it computes the source exactly); continued training anneals
it to the configured top-k routing with :func:`gohgraph.training.schedules.dense_to_sparse_schedule`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..config import ROUTERS
from ..data.tokenizers import TOKENIZER_FILE
from ..storage import CONFIG_NAME, WEIGHTS_NAME
from .common import add_overwrite_argument, prepare_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, metavar="DIR",
                        help="local Hugging Face checkpoint directory (LlamaForCausalLM, GPT2LMHeadModel, "
                             "MixtralForCausalLM, Qwen2MoeForCausalLM, BertForMaskedLM or "
                             "BertForSequenceClassification)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the GoH checkpoint")
    parser.add_argument("--router", default="graph", choices=ROUTERS, help="head router (default: graph)")
    parser.add_argument("--n-shared-heads", type=int, default=0, metavar="N", help="always-on heads per layer")
    parser.add_argument("--top-k-heads", type=int, default=None, metavar="K",
                        help="routed heads active per token (default: every routed head)")
    parser.add_argument("--router-rounds", type=int, default=None, metavar="R",
                        help="message-passing rounds of the graph router")
    parser.add_argument("--ffn", default=None, choices=("dense", "moe"),
                        help="for a dense source: keep its MLP (default), or upcycle it into n-experts copies; "
                             "a Mixtral or Qwen2-MoE source keeps its own experts")
    parser.add_argument("--n-experts", type=int, default=None, metavar="N", help="experts per layer for --ffn moe")
    parser.add_argument("--top-k-experts", type=int, default=None, metavar="K",
                        help="experts per token for --ffn moe")
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ..interop.convert import convert_hf_model
    from ..models.families import family_of

    if Path(args.out).resolve() == Path(args.source).resolve():
        raise ValueError(f"--out {args.out} is the source directory; choose another so the source is kept")
    if Path(args.out).exists() and not args.overwrite:  # checked before the (slow) conversion
        prepare_output(Path(args.out), overwrite=False, is_directory=True)
    for flag in ("n_experts", "top_k_experts"):  # they size the experts --ffn moe makes; nothing else reads them
        if getattr(args, flag) is not None and args.ffn != "moe":
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} sizes the experts of --ffn moe; "
                             "add --ffn moe to upcycle a dense source (a Mixtral or Qwen2-MoE source keeps its own)")
    if args.router == "dense" and (args.top_k_heads is not None or args.n_shared_heads):
        raise ValueError("--top-k-heads and --n-shared-heads choose routed heads; --router dense keeps every head on")
    if args.router_rounds is not None and args.router != "graph":
        raise ValueError(f"--router-rounds {args.router_rounds} are the graph router's message-passing rounds; "
                         f"--router {args.router} has none")
    overrides = {"router": args.router, "n_shared_heads": args.n_shared_heads, "top_k_heads": args.top_k_heads}
    optional = {"router_rounds": args.router_rounds, "n_experts": args.n_experts,
                "top_k_experts": args.top_k_experts, "ffn": args.ffn}
    overrides.update({name: value for name, value in optional.items() if value is not None})
    try:
        model = convert_hf_model(args.source, **overrides)
    except ImportError as err:  # the optional hf extra is missing: one line, as for user errors
        print(f"gohgraph convert: error: {err}", file=sys.stderr)
        return 1
    out = prepare_output(Path(args.out), args.overwrite, is_directory=True,
                         replaces=(CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_FILE))
    model.save_pretrained(out)
    tokenizer = Path(args.source) / TOKENIZER_FILE
    if tokenizer.is_file():  # the tokenizer travels with the model: train/eval/generate read it from here
        shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
    cfg = model.config
    depths = family_of(cfg).stack_depths(cfg)  # one stack: "4 layers"; two: "2 encoder + 3 decoder layers"
    layers = " + ".join(f"{n} {stack}" if len(depths) > 1 else f"{n}" for stack, n in depths.items()) + " layers"
    print(f"converted {args.source} -> {out}: {layers}, {cfg.n_heads} heads "
          f"({cfg.kv_heads} kv), router={cfg.router}, active heads {cfg.active_heads}/{cfg.n_heads}, "
          f"ffn={cfg.ffn}, {model.num_parameters():,} parameters; dense_blend=1.0 "
          "(anneal with gohgraph.training.schedules.dense_to_sparse_schedule while training)")
    print(f"tokenizer: {out / TOKENIZER_FILE if tokenizer.is_file() else f'none in {args.source}: train with the tokenizer the source model used'}")
    if cfg.router != "dense" and cfg.active_heads == cfg.n_heads:
        print("note: every head stays active (no --top-k-heads): continued training with --dense-anneal-steps "
              "has nothing to anneal to; convert with e.g. --top-k-heads 4 to route heads", file=sys.stderr)
    return 0
