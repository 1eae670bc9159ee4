"""``gohgraph train``: train any task (``--objective lm|mlm|classify|seq2seq``) from a preset, a
config file and flags, through the one training loop (:mod:`gohgraph.training.trainer`).

Precedence for a new run: the task's preset (``--preset``, default ``tiny``), then ``--config``
(JSON or YAML), then flags and ``--set``; the same for every task. With ``--resume`` the run's own
saved configs are the base and only explicit flags change them (e.g. ``--max-steps`` to train
longer). Works the same under ``torchrun --nproc_per_node=N -m gohgraph train ...``.
The run directory holds ``data.json`` (the data settings, read again on resume) and
``objective.json`` (the task, which ``gohgraph eval`` scores the run by).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import shutil
import sys
import warnings
from pathlib import Path

from ..config import ROUTERS, GoHConfig
from ..data.sources import parse_data_flags
from ..data.tokenizers import TOKENIZER_FILE
from ..models.compile import CompileUnavailableWarning
from ..storage import read_config
from ..training.config import TrainConfig
from ..training.presets import PRESETS, read_config_file, split_fields
from ..training.run_dir import RunDir
from ..training.tasks import TASKS, Task, get_task
from ..training.trainer import TrainResult, check_task_settings, train
from .common import TRAIN_FLAGS, check_device, note_missing_tensorboard, parse_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="the task's named model + training preset (default tiny)")
    parser.add_argument("--config", type=Path, help="JSON or YAML file of GoHConfig/TrainConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any GoHConfig or TrainConfig field (repeatable); values are parsed "
                             "by the field's type: booleans true/false/1/0, integers, numbers, null")
    parser.add_argument("--router", choices=ROUTERS, help="head router (GoHConfig.router)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps to train for (in total, when resuming)")
    parser.add_argument("--batch-size", type=int, help="sequences per micro-step over all processes")
    parser.add_argument("--seq-len", type=int, help="tokens per training window")
    parser.add_argument("--lr", type=float, help="peak learning rate (warmup, then cosine decay)")
    parser.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step")
    parser.add_argument("--warmup-steps", type=int, help="linear learning-rate warmup steps")
    parser.add_argument("--eval-every", type=int, help="steps between validation runs")
    parser.add_argument("--save-every", type=int, help="steps between checkpoints")
    parser.add_argument("--seed", type=int, help="seed of the weights and of the batches")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"],
                        help="auto (default): bf16 autocast on CUDA, float32 on CPU")
    parser.add_argument("--force", action="store_true",
                        help="start even when the memory estimate of a step exceeds the available memory")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 under torchrun instead of DDP")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the training step's forward and backward (eager, with one line "
                             "saying why, where it cannot compile)")
    parser.add_argument("--expert-parallel", type=int, metavar="N",
                        help="shard each MoE layer's routed experts over the N torchrun processes (all-to-all "
                             "dispatch; DDP, or FSDP2 with --fsdp, for the rest)")
    parser.add_argument("--tensor-parallel", type=int, metavar="N",
                        help="shard every attention's heads and dense FFN over the N torchrun processes "
                             "(DTensor; all read the same batch; no DDP beside it)")
    parser.add_argument("--init-from", type=Path,
                        help="start from this save_pretrained directory's model (e.g. from gohgraph convert)")
    parser.add_argument("--dense-anneal-steps", type=int,
                        help="anneal heads from dense (all on) to top-k over this many steps")
    parser.add_argument("--data", action="append", default=None, metavar="[NAME=]PATH[:WEIGHT]",
                        help="text file, directory or glob (default: the Python standard library); repeat as "
                             "NAME=PATH[:WEIGHT] to train on several sources sampled by weight, with a "
                             "validation loss per source")
    parser.add_argument("--tokenizer", default=None,
                        help="byte (default), bpe or bpe:<vocab> (trained on the training texts), or "
                             "file:<tokenizer.json>")
    parser.add_argument("--cache-dir", type=Path, help="token cache (default $GOHGRAPH_CACHE or ~/.cache/gohgraph)")
    parser.add_argument("--run-dir", type=Path,
                        help="where checkpoints and metrics go (default runs/<name>, overrides --name)")
    parser.add_argument("--name", help="run name: the run goes to runs/<name> (default: runs/default)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run's checkpoints first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--objective", choices=list(TASKS), default="lm",
                        help="lm (default: decoder, next token), mlm (encoder, masked LM), classify "
                             "(encoder, which standard-library package a snippet is from) or seq2seq "
                             "(encoder-decoder, docstring -> def line, or --data pair files)")


def run(args: argparse.Namespace) -> int:
    task = get_task(args.objective)
    check_resume_flags(args)
    run_dir = args.run_dir or Path("runs") / (args.name or ("default" if task.name == "lm" else task.name))
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run dir {run_dir} is a file; choose another --run-dir or --name")
    if args.resume and RunDir(run_dir).latest_checkpoint() is None:  # before anything of the run is rewritten
        raise ValueError(f"nothing to resume: {run_dir} holds no checkpoint; drop --resume to start a new run")
    if args.cache_dir is not None and not task.token_cache:
        raise ValueError(f"--cache-dir: --objective {task.name} tokenizes its texts in memory and keeps no token cache; "
                         f"only --objective {' and '.join(t.name for t in TASKS.values() if t.token_cache)} use one")
    model_config, train_config, data_settings = build_configs(args, run_dir, task)
    check_task_settings(task, train_config)
    if train_config.device != "auto":
        check_device(train_config.device)
    rank, run = int(os.environ.get("RANK", "0")), RunDir(run_dir)
    # one writer: rank 0 holds the run's lock from here (the trainer takes it again, re-entrantly)
    with run.lock() if rank == 0 else contextlib.nullcontext():
        return _run_locked(args, task, run, model_config, train_config, data_settings, rank)


def _run_locked(args: argparse.Namespace, task: Task, run: RunDir, model_config: GoHConfig,
                train_config: TrainConfig, data_settings: dict, rank: int) -> int:
    run_dir = run.path
    has_run = run.has_checkpoints() or run.final_dir.exists()
    if has_run and not args.resume and not args.overwrite:
        raise ValueError(f"run dir {run_dir} already holds a trained model or checkpoints; pass --resume to "
                         "continue it, --overwrite to start again, or --name/--run-dir for a new run")
    data = task.load_data(data_settings, args.cache_dir, train_config, model_config)
    if args.resume:
        _check_resumed_data(run, task, data)
    else:
        model_config = task.fit_model_config(model_config, data, train_config, explicit_model_fields(args),
                                             args.init_from)
    task.check_model_fits(model_config, data, train_config)
    _note_dense_anneal(model_config, train_config)
    if has_run and not args.resume and rank == 0:  # --overwrite, once the data and configs have been checked
        for folder in (run.final_dir, run.checkpoints_dir):
            shutil.rmtree(folder, ignore_errors=True)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        run.write_data_settings(data_settings)
    with warnings.catch_warnings():
        warnings.showwarning = _compile_fallback_in_one_line(warnings.showwarning)
        result = train(model_config, train_config, data, run_dir, resume=args.resume, progress=not args.no_progress,
                       check_memory=not args.force, task=task, data_settings=data_settings)
    if rank == 0:
        _print_summary(args, task, result, data, train_config, run_dir)
        note_missing_tensorboard(train_config)
    return 130 if result.interrupted else 0


def _print_summary(args: argparse.Namespace, task: Task, result: TrainResult, data, tc: TrainConfig,
                   run_dir: Path) -> None:
    """What the run did, its task's final scores, where it wrote."""
    cfg = result.model.config
    print(f"data: {task.describe_data(data)}")
    print(f"model: {type(result.model).__name__}, {result.model.num_parameters():,} parameters, router={cfg.router}, "
          f"ffn={cfg.ffn}")
    print(f"steps: {result.steps} of {tc.max_steps}, tokens: {result.tokens_seen:,}, {result.tokens_per_s:,.0f} "
          f"tokens/s, {result.seconds:.0f} s")
    if result.history:
        for line in task.summary(result.metrics, data, cfg):
            print(line + f" (eval_batches={tc.eval_batches})")
    if result.interrupted:
        print(f"interrupted at step {result.steps}; continue with: gohgraph train --objective {task.name} --resume "
              f"--run-dir {run_dir}")
    else:
        for line in task.final_lines(result.model, data, tc):
            print(line)
    print(f"checkpoint: {result.checkpoint_path}")
    if result.final_path is not None:
        print(f"final model: {result.final_path}")
    print(f"metrics: {result.metrics_path}")


def _check_resumed_data(run: RunDir, task: Task, data) -> None:
    """The data of a resumed run must be what it was trained on where the model depends on it (labels)."""
    saved = run.read_objective()
    if saved.get("objective", "lm") != task.name:
        raise ValueError(f"{run.path} is an --objective {saved.get('objective', 'lm')} run; resume it with that "
                         "objective")
    task.check_same_data(saved, data, f"the run in {run.path}")


def check_resume_flags(args: argparse.Namespace) -> None:
    """``--resume`` continues the run's saved configs: the flags that choose a new run's starting
    point would be ignored, so they are refused (single values still change with flags and ``--set``)."""
    if not args.resume:
        return
    for flag in ("preset", "config", "init_from"):
        if getattr(args, flag, None) is not None:
            raise ValueError(f"--resume continues the run's saved model and train configs; --{flag.replace('_', '-')} "
                             "only starts a new run (change single values with flags or --set, or drop --resume)")


def _compile_fallback_in_one_line(show):
    """A ``warnings.showwarning`` that prints a compile fallback as the command's one line, when it
    happens (the run goes on, eagerly), and leaves every other warning to ``show``."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CompileUnavailableWarning):
            print(f"gohgraph train: --compile: {message}", file=sys.stderr, flush=True)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def build_configs(args: argparse.Namespace, run_dir: Path, task: Task):
    """(GoHConfig, TrainConfig, data settings) from the run (on resume) or the task's preset, file and flags."""
    run = RunDir(run_dir)
    saved = run.latest_checkpoint() if args.resume else None
    if saved is not None:
        model_kwargs = read_config(saved).to_dict()
        train_kwargs = run.read_train_config()
        objective = run.read_objective()  # runs of the objectives' former loop kept their data there
        data_settings = run.read_data_settings(default={"data": objective.get("data"),
                                                        "tokenizer": objective.get("tokenizer") or "byte"})
    else:
        file_values = read_config_file(args.config) if args.config else {}
        model_kwargs, train_kwargs = task_preset(task, args.preset or file_values.get("preset", "tiny"))
        if args.init_from is not None:  # the model is the one being continued, not the preset's
            model_kwargs = task.continued_model_config(read_config(args.init_from).to_dict(), args.init_from)
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
    if args.compile:
        train_kwargs["compile"] = True
    if args.data:  # given flags replace the base's data (a resumed run's data.json included)
        data_settings.pop("sources", None)
        data_settings.update(parse_data_flags(args.data))
    if args.tokenizer is not None:
        data_settings["tokenizer"] = args.tokenizer
    if args.init_from is not None and args.tokenizer is None and (args.init_from / TOKENIZER_FILE).is_file():
        data_settings["tokenizer"] = f"file:{args.init_from / TOKENIZER_FILE}"  # the model's own tokenizer
    return GoHConfig.from_dict(model_kwargs), TrainConfig.from_dict(train_kwargs), data_settings


def task_preset(task: Task, name: str):
    """A deep copy of ``task``'s preset ``name``: ``(GoHConfig kwargs, TrainConfig kwargs)``."""
    if name not in task.presets:
        raise ValueError(f"preset={name!r} is not one of --objective {task.name}'s presets {sorted(task.presets)}")
    model_kwargs, train_kwargs = task.presets[name]
    return copy.deepcopy(model_kwargs), copy.deepcopy(train_kwargs)


def explicit_model_fields(args: argparse.Namespace) -> set:
    """GoHConfig fields the user set by name (``--set``, ``--config``), which are never silently changed."""
    names = {pair.partition("=")[0].strip() for pair in args.set}
    if args.config is not None:
        names |= set(split_fields(read_config_file(args.config), str(args.config))[0])
    return names


def _note_dense_anneal(cfg: GoHConfig, train_config: TrainConfig) -> None:
    if train_config.dense_anneal_steps and cfg.router != "dense" and cfg.active_heads == cfg.n_heads:
        print(f"note: --dense-anneal-steps {train_config.dense_anneal_steps} has nothing to anneal to: every "
              f"head stays active (n_shared_heads={cfg.n_shared_heads}, top_k_heads={cfg.top_k_heads}); "
              "set top_k_heads below the routed heads, e.g. --set top_k_heads=2", file=sys.stderr)
