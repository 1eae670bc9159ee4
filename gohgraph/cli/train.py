"""``gohgraph train``: train a graph-routed LM from a preset, a config file and flags.

Precedence for a new run: preset, then ``--config`` (JSON or YAML), then flags and ``--set``.
With ``--resume`` the run's own saved configs are the base and only explicit flags change them
(e.g. ``--max-steps`` to train longer). Works the same under
``torchrun --nproc_per_node=N -m gohgraph train ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path

from ..config import GoHConfig
from ..data.corpus import load_corpus
from ..storage import atomic_write_text, read_config
from ..training.checkpoint import CHECKPOINTS_DIR, latest_checkpoint
from ..training.config import TrainConfig
from ..training.presets import PRESETS, get_preset, read_config_file, split_fields
from ..training.trainer import train
from .common import parse_overrides

# flag name -> TrainConfig field (None = not given, keep the base value)
TRAIN_FLAGS = {"max_steps": "max_steps", "batch_size": "batch_size", "seq_len": "seq_len", "lr": "lr",
               "grad_accum": "grad_accum_steps", "warmup_steps": "warmup_steps", "eval_every": "eval_every",
               "save_every": "save_every", "seed": "seed", "device": "device", "dtype": "dtype",
               "dense_anneal_steps": "dense_anneal_steps"}
DATA_FILE = "data.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named model + training preset (default tiny)")
    parser.add_argument("--config", type=Path, help="JSON or YAML file of GoHConfig/TrainConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any GoHConfig or TrainConfig field (repeatable)")
    parser.add_argument("--router", choices=["dense", "linear", "graph"], help="head router (GoHConfig.router)")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--batch-size", type=int, help="sequences per micro-step over all processes")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--grad-accum", type=int)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--save-every", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 under torchrun instead of DDP")
    parser.add_argument("--init-from", type=Path,
                        help="start from this save_pretrained directory's model (e.g. from gohgraph convert)")
    parser.add_argument("--dense-anneal-steps", type=int,
                        help="anneal heads from dense (all on) to top-k over this many steps")
    parser.add_argument("--data", help="text file, directory or glob (default: the Python standard library)")
    parser.add_argument("--tokenizer", default=None, help="byte (default), bpe or bpe:<vocab>")
    parser.add_argument("--cache-dir", type=Path, help="token cache (default $GOHGRAPH_CACHE or ~/.cache/gohgraph)")
    parser.add_argument("--run-dir", type=Path,
                        help="where checkpoints and metrics go (default runs/<name>, overrides --name)")
    parser.add_argument("--name", help="run name: the run goes to runs/<name> (default: runs/default)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run's checkpoints first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    run_dir = args.run_dir or Path("runs") / (args.name or "default")
    model_config, train_config, data_settings = build_configs(args, run_dir)
    rank = int(os.environ.get("RANK", "0"))
    has_checkpoint = (run_dir / CHECKPOINTS_DIR).is_dir() and any((run_dir / CHECKPOINTS_DIR).iterdir())
    if has_checkpoint and not args.resume:
        if not args.overwrite:
            raise ValueError(f"run dir {run_dir} already holds checkpoints; pass --resume to continue it, "
                             "--overwrite to start again, or --name/--run-dir for a new run")
        if rank == 0:
            shutil.rmtree(run_dir / CHECKPOINTS_DIR)
    corpus = load_corpus(data_settings["data"], args.cache_dir, data_settings["tokenizer"])
    if model_config.vocab_size < corpus.vocab_size:
        model_config = model_config.replace(vocab_size=corpus.vocab_size)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / DATA_FILE, json.dumps(data_settings, indent=2) + "\n")
    result = train(model_config, train_config, corpus, run_dir, resume=args.resume,
                   progress=not args.no_progress)
    if rank == 0:
        params = result.model.num_parameters()
        print(f"data: {corpus.source} ({len(corpus.train):,} train / {len(corpus.val):,} val tokens)")
        print(f"model: {params:,} parameters, router={model_config.router}, ffn={model_config.ffn}")
        print(f"steps: {result.steps}, tokens: {result.tokens_seen:,}, {result.tokens_per_s:,.0f} tokens/s")
        if result.val_history:
            print(f"validation loss: {result.final_val_loss:.4f} nats/token")
        if result.interrupted:
            print(f"interrupted at step {result.steps}; continue with: gohgraph train --resume --run-dir {run_dir}")
        print(f"checkpoint: {result.checkpoint_path}")
        if result.final_path is not None:
            print(f"final model: {result.final_path}")
        print(f"metrics: {result.metrics_path}")
    return 130 if result.interrupted else 0


def build_configs(args: argparse.Namespace, run_dir: Path):
    """(GoHConfig, TrainConfig, data settings) from the run (on resume) or preset, file and flags."""
    saved = latest_checkpoint(run_dir) if args.resume else None
    if saved is not None:
        model_kwargs = read_config(saved).to_dict()
        train_kwargs = json.loads((run_dir / "train_config.json").read_text(encoding="utf-8")) \
            if (run_dir / "train_config.json").is_file() else {}
        data_settings = json.loads((run_dir / DATA_FILE).read_text(encoding="utf-8")) \
            if (run_dir / DATA_FILE).is_file() else {"data": None, "tokenizer": "byte"}
    else:
        file_values = read_config_file(args.config) if args.config else {}
        model_kwargs, train_kwargs = get_preset(args.preset or file_values.get("preset", "tiny"))
        if args.init_from is not None:  # the model is the one being continued, not the preset's
            model_kwargs = read_config(args.init_from).to_dict()
            train_kwargs["init_from"] = str(args.init_from)
        file_model, file_train = split_fields(file_values, str(args.config))
        model_kwargs.update(file_model)
        train_kwargs.update(file_train)
        data_settings = {"data": None, "tokenizer": "byte"}
    known_fields = [f.name for config in (GoHConfig, TrainConfig) for f in dataclasses.fields(config)]
    set_model, set_train = split_fields(parse_overrides(args.set, known_fields), "--set")
    model_kwargs.update(set_model)
    train_kwargs.update(set_train)
    if args.router is not None:
        model_kwargs["router"] = args.router
    for flag, field_name in TRAIN_FLAGS.items():
        if getattr(args, flag) is not None:
            train_kwargs[field_name] = getattr(args, flag)
    if args.fsdp:
        train_kwargs["fsdp"] = True
    if args.data is not None:
        data_settings["data"] = args.data
    if args.tokenizer is not None:
        data_settings["tokenizer"] = args.tokenizer
    train_config = TrainConfig.from_dict(train_kwargs)
    model_kwargs.setdefault("max_seq_len", train_config.seq_len + 1)
    if model_kwargs["max_seq_len"] < train_config.seq_len + 1:
        model_kwargs["max_seq_len"] = train_config.seq_len + 1  # windows hold seq_len + 1 tokens
    return GoHConfig.from_dict(model_kwargs), train_config, data_settings
