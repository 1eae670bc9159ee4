"""``gohgraph bench``: the comparison table of dense, MoH, GoH, SMoE, fine-grained SMoE, MH-MoE and
GoH-MoE at matched total parameters (:mod:`gohgraph.experiments`), for any training task.

    gohgraph bench --quick                      # tiny models, 3 seeds, < 10 minutes on 2 CPU cores
    gohgraph bench --seeds 3 --out runs/bench   # the full setting (43 min on 2 CPU cores)
    gohgraph bench --quick --variants dense GoH --steps 50 --seeds 1
    gohgraph bench --quick --variants MoH GoH --first-seed 3     # three more seeds (3, 4, 5)
    gohgraph bench --quick --match active                        # compute-matched: experts grow in total size
    gohgraph bench --quick --match flops --variants switchhead mosa  # equal training FLOPs per token (within 2%)
    gohgraph bench --variants GoH --router-rounds 2 --router-dim 16  # another graph router, same seeds
    gohgraph bench --variants MH-MoE --set subtoken_projections=false  # MH-MoE without head/merge layers
    gohgraph bench --variants GoH --set inter_head_flow=false          # GoH without inter-head flow
    gohgraph bench --quick --bitnet        # MH-MoE's Table 3: every FFN kind with BitNet b1.58, fp dense as reference
    gohgraph bench --quick --mor           # Mixture-of-Recursions at matched parameters and at matched depth
    gohgraph bench --quick --objective mlm # the same rows as encoders, trained as masked LMs (classify, seq2seq too)

Writes ``OUT/compare.md`` (the table), ``OUT/compare.json`` (every number) and
``OUT/compare_loss.png`` (validation loss against training tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
from pathlib import Path

from .common import parse_overrides

OUTPUT_FILES = ("compare.md", "compare.json", "compare_loss.png")
# what the comparison itself decides per variant: its kind, and the width the matching fits
PROTOCOL_FIELDS = {"ffn", "router", "vocab_size", "ffn_hidden", "expert_hidden"}
WHY_PROTECTED = ("the comparison sets {name} itself (a variant's kind, the width the matching fits, or the "
                 "setting's shape, shared with dense); the graph routers' rounds and width have "
                 "--router-rounds and --router-dim")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..experiments.variants import ALL_VARIANT_NAMES, BITNET_VARIANT_NAMES, MOR_VARIANT_NAMES, VARIANT_NAMES
    from ..training.tasks import TASKS

    parser.add_argument("--quick", action="store_true", help="the quick setting (tiny models, short runs)")
    parser.add_argument("--objective", choices=list(TASKS), default="lm",
                        help="the training task every row is trained on (default lm); the rows become models of "
                             "its family (encoders for mlm and classify, encoder-decoders for seq2seq)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST..FIRST+N-1")
    parser.add_argument("--out", default="runs/bench", help="directory for compare.md/.json/_loss.png")
    parser.add_argument("--overwrite", action="store_true", help="replace compare.md/.json/_loss.png if present")
    parser.add_argument("--data", default=None,
                        help="the task's data: a text file, directory or glob (lm, mlm), labelled texts (classify) or "
                             "pair files (seq2seq); default: the task's standard-library data")
    parser.add_argument("--variants", nargs="+", default=None, choices=ALL_VARIANT_NAMES, metavar="NAME",
                        help=f"subset of {list(ALL_VARIANT_NAMES)} (default: the first seven, {list(VARIANT_NAMES)}; "
                             "'dense' is always the reference)")
    parser.add_argument("--bitnet", action="store_true",
                        help=f"add the BitNet b1.58 rows {list(BITNET_VARIANT_NAMES)} (MH-MoE's Table 3; "
                             "without --variants: only them and the full-precision dense reference)")
    parser.add_argument("--mor", action="store_true",
                        help=f"add the Mixture-of-Recursions rows {list(MOR_VARIANT_NAMES)} (matched parameters, "
                             "and matched depth without resizing; without --variants: only them and dense)")
    parser.add_argument("--match", choices=["total", "active", "flops"], default="total",
                        help="match every variant to dense's total parameters (default), its active parameters per "
                             "token, or its training FLOPs per token (counted at the setting's sequence length)")
    parser.add_argument("--steps", type=int, default=None, help="override the setting's training steps")
    parser.add_argument("--dense-anneal-steps", type=int, default=None,
                        help="routed-head variants start with every head on and anneal to top-k over this many "
                             "steps (TrainConfig.dense_anneal_steps; default 0: routed from the first step)")
    parser.add_argument("--router-rounds", type=int, default=None,
                        help="message-passing rounds of the graph routers (GoH, GoH-MoE; default: the setting's 1)")
    parser.add_argument("--router-dim", type=int, default=None,
                        help="node feature width of the graph routers (default: the setting's 8)")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", dest="overrides",
                        help="GoHConfig fields changed in every variant but dense before matching, e.g. "
                             "inter_head_flow=false (VALUE is read as JSON, else as a string); fields a "
                             "variant does not use change nothing in it")
    parser.add_argument("--eval-batches", type=int, default=None,
                        help="validation batches for the final loss (default: the whole validation split)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--keep-runs", action="store_true", help="keep checkpoints and metrics under OUT/runs")
    parser.add_argument("--no-progress", action="store_true", help="print nothing per run")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..config import GoHConfig
    from ..experiments.run import run_comparison
    from ..experiments.variants import (
        BITNET_VARIANT_NAMES,
        MOR_VARIANT_NAMES,
        SETTINGS,
        comparison_variants,
        match_parameters,
        task_variants,
    )
    from ..training.config import TrainConfig
    from ..training.tasks import get_task

    if args.seeds < 1:
        raise ValueError(f"--seeds={args.seeds} must be >= 1")
    torch.set_num_threads(args.threads)
    setting = "quick" if args.quick else "full"
    model_shape, schedule = SETTINGS[setting]
    router = {key: value for key, value in (("router_rounds", args.router_rounds), ("router_dim", args.router_dim))
              if value is not None}
    model_shape = dict(model_shape, **router)
    names = args.variants
    for wanted, extra in ((args.bitnet, BITNET_VARIANT_NAMES), (args.mor, MOR_VARIANT_NAMES)):
        if wanted:
            names = [*(names or []), *(name for name in extra if name not in (names or []))]
    if names is not None and "dense" not in names:
        names = ["dense", *names]
    overrides = parse_overrides(args.overrides, [f.name for f in dataclasses.fields(GoHConfig)],
                                protected=set(model_shape) | PROTOCOL_FIELDS, why_protected=WHY_PROTECTED)
    variants = {name: config if name == "dense" else config.replace(**overrides)
                for name, config in comparison_variants(**model_shape, names=names).items()}
    task = get_task(args.objective)
    if args.mor and not task.recursion:
        raise ValueError(f"--mor: --objective {task.name} trains {task.model_type} models, and only decoders "
                         "recurse (Mixture-of-Recursions)")
    if args.match == "flops" and task.name != "lm":
        raise ValueError(f"--match flops: --objective {task.name} trains {task.model_type} models; the FLOP matching "
                         "counts a decoder's next-token training step (--objective lm)")
    schedule = dict(schedule, **({"max_steps": args.steps} if args.steps else {}))
    if args.steps:
        schedule["eval_every"] = max(1, min(schedule["eval_every"], args.steps))
        schedule["warmup_steps"] = min(schedule["warmup_steps"], args.steps)
    if args.dense_anneal_steps is not None:
        schedule["dense_anneal_steps"] = args.dense_anneal_steps
    train_config = TrainConfig(**schedule)
    data = task.load_data({"data": args.data, "tokenizer": "byte"}, None, train_config,
                          next(iter(variants.values())))
    variants = match_parameters(task_variants(variants, task, data, train_config), on=args.match,
                                seq_len=schedule["seq_len"])
    out = Path(args.out)
    existing = [out / name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not args.overwrite:  # checked before the (long) comparison runs
        raise ValueError(f"{existing[0]} already exists; pass --overwrite to replace the comparison in {out}, "
                         "or choose another --out")
    machine = (f"Setting `{setting}`; torch {torch.__version__}, {torch.get_num_threads()} threads, "
               f"{platform.processor() or platform.machine()}, Python {platform.python_version()}.")
    if router:
        machine += (f" Graph routers: {model_shape['router_rounds']} round(s) of {model_shape['router_dim']}-wide "
                    "node features (overridden; GoH-MoE's at least as wide as its expert count).")
    changed = next((v.config for name, v in variants.items() if name != "dense"), None)
    if overrides and changed is not None:
        machine += " Changed in every variant but dense: " + ", ".join(
            f"{k}={getattr(changed, k)!r}" for k in overrides) + "."
    comparison = run_comparison(variants, train_config, data, out,
                                seeds=range(args.first_seed, args.first_seed + args.seeds), final_eval_batches=args.eval_batches,
                                run_dir=out / "runs" if args.keep_runs else None,
                                progress=not args.no_progress, description=machine, task=task.name)
    print((out / "compare.md").read_text(encoding="utf-8"))
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'} and {out / 'compare_loss.png'} "
          f"in {comparison.elapsed_s:.0f} s")
    return 0


