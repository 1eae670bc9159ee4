"""``gohgraph train --objective mlm|classify|seq2seq`` and ``gohgraph eval`` of such a run (docs/encoder.md, docs/seq2seq.md).

The objective's preset (:data:`~gohgraph.training.objectives.OBJECTIVE_PRESETS`), then ``--config``, ``--set``
and the training flags; the model's vocabulary is the data tokenizer's plus the three special
tokens (four for seq2seq: its targets end with ``eos``; ``pad`` pads and starts the decoder, as
in T5). One process; writes ``final/``, ``objective.json``, ``metrics.json`` in the run dir.
Data: one ``--data`` path; for ``mlm`` text (default: the standard library), for ``classify``
labelled ``.tsv`` / ``.jsonl`` files (:mod:`gohgraph.data.record_files`; default: the standard
library's package snippets), for ``seq2seq`` pair files (default: the standard library's
docstring -> def line pairs), byte tokens. ``objective.json`` keeps the path, so ``eval`` reads
the same data. Checkpoints every ``save_every`` steps and on Ctrl-C (exit 130); ``--resume``
continues the run from its latest one, with its data, model and train config (explicit flags
change the train config, e.g. ``--max-steps`` to train longer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Optional

from ..config import GoHConfig
from ..data.corpus import load_corpus
from ..data.objectives import SpecialTokens
from ..data.objectives.classify import labelled_file_data, stdlib_package_snippets
from ..data.objectives.mlm import unigram_entropy
from ..data.objectives.seq2seq import EncodedPairs, encode_pair_data, load_pair_data
from ..data.sources import parse_data_flags
from ..data.tokenizers import ByteTokenizer
from ..storage import read_config, read_json
from ..training.config import TrainConfig
from ..training.objectives import OBJECTIVE_PRESETS, check_objective_settings, evaluate_objective, train_objective
from ..training.presets import read_config_file, split_fields
from ..training.run_dir import TRAINING_STATE, RunDir
from .common import TRAIN_FLAGS, note_missing_tensorboard, parse_overrides


def build_objective_configs(args: argparse.Namespace, base_vocab: int, saved: Optional[dict] = None):
    """(GoHConfig, TrainConfig) of ``args.objective``: preset (or, on resume, the ``saved`` run's
    ``{"model": ..., "train": ...}`` configs; with ``--init-from``, that model's config), then
    ``--set``, then flags."""
    init_from = getattr(args, "init_from", None)
    if saved is not None:
        model_kwargs, train_kwargs = dict(saved["model"]), dict(saved["train"])
    else:
        model_kwargs, train_kwargs = (dict(values) for values in OBJECTIVE_PRESETS[args.objective])
        if init_from is not None:
            model_kwargs = continued_model_config(init_from, args.objective, model_kwargs)
            train_kwargs["init_from"] = str(init_from)
        if getattr(args, "config", None) is not None:  # a config file's fields, over the objective's preset
            file_values = read_config_file(args.config)
            if "preset" in file_values:
                raise ValueError(f"{args.config}: 'preset' names a language-model preset; --objective "
                                 f"{args.objective} starts from its own (drop 'preset', keep the fields)")
            file_model, file_train = split_fields(file_values, str(args.config))
            model_kwargs.update(file_model)
            train_kwargs.update(file_train)
    known = [f.name for config in (GoHConfig, TrainConfig) for f in dataclasses.fields(config)]
    set_model, set_train = split_fields(parse_overrides(args.set, known), "--set")
    model_kwargs.update(set_model)
    train_kwargs.update(set_train)
    if args.router is not None:
        model_kwargs["router"] = args.router
    for flag, name in TRAIN_FLAGS.items():
        if getattr(args, flag, None) is not None:
            train_kwargs[name] = getattr(args, flag)
    for flag in ("fsdp", "compile"):  # given, they must reach the check below, not vanish
        if getattr(args, flag, False):
            train_kwargs[flag] = True
    train_config = TrainConfig.from_dict(train_kwargs)
    check_objective_settings(train_config, args.objective)
    if saved is not None:  # the checkpoint's model as it is; the trainer refuses a changed one
        return GoHConfig.from_dict(model_kwargs), train_config
    special = SpecialTokens(base_vocab, with_eos=args.objective == "seq2seq")
    if init_from is not None:  # the model's sizes are the saved weights'
        return _fits_the_data(GoHConfig.from_dict(model_kwargs), init_from, special, train_config, args.objective), \
            train_config
    model_kwargs["vocab_size"] = special.vocab_size
    model_kwargs["max_seq_len"] = max(model_kwargs.get("max_seq_len", 0), train_config.seq_len)
    if args.objective == "seq2seq":
        model_kwargs.update(pad_token_id=special.pad, decoder_start_token_id=special.pad)
        # the decoder reads the start token and then up to seq_len target tokens
        model_kwargs["max_seq_len"] = max(model_kwargs["max_seq_len"], train_config.seq_len + 1)
    return GoHConfig.from_dict(model_kwargs), train_config


def continued_model_config(directory: Path, objective: str, preset: dict) -> dict:
    """The config of the ``save_pretrained`` model at ``directory`` as the start of an ``objective``
    run: an encoder for mlm/classify (classify adds the preset's head to a model without one), an
    encoder-decoder for seq2seq."""
    model_kwargs = read_config(directory).to_dict()
    wanted = "seq2seq" if objective == "seq2seq" else "encoder"
    if model_kwargs["model_type"] != wanted:
        raise ValueError(f"--init-from {directory} holds a model_type={model_kwargs['model_type']!r} model; "
                         f"--objective {objective} continues {wanted} models")
    if objective == "classify" and not model_kwargs["n_labels"]:  # e.g. an MLM-pretrained encoder
        model_kwargs.update(n_labels=preset["n_labels"], classifier_pooling=preset["classifier_pooling"])
    return model_kwargs


def _fits_the_data(cfg: GoHConfig, directory: Path, special: SpecialTokens, tc: TrainConfig,
                   objective: str) -> GoHConfig:
    """``cfg`` of an ``--init-from`` model, if the objective's byte tokens and lengths fit it."""
    if cfg.vocab_size != special.vocab_size:
        raise ValueError(f"--init-from {directory} has vocab_size {cfg.vocab_size}; --objective {objective} reads "
                         f"byte tokens and its special tokens ({special.vocab_size} ids), so it continues models "
                         "trained by gohgraph's objectives")
    longest = tc.seq_len + 1 if objective == "seq2seq" else tc.seq_len  # + the decoder's start token
    if longest > cfg.max_seq_len:
        raise ValueError(f"--seq-len {tc.seq_len} is longer than the --init-from model's max_seq_len "
                         f"{cfg.max_seq_len}")
    return cfg


def run_train(args: argparse.Namespace) -> int:
    if getattr(args, "preset", None) is not None:
        raise ValueError(f"--preset {args.preset} is a language-model preset; --objective {args.objective} starts "
                         "from its own (change its values with --config or --set)")
    if getattr(args, "cache_dir", None) is not None and args.objective != "mlm":
        raise ValueError(f"--cache-dir: --objective {args.objective} reads its texts as bytes and keeps no token "
                         "cache; only --objective mlm and lm use one")
    run = RunDir(args.run_dir or Path("runs") / (args.name or args.objective))
    with run.lock():  # one writer from here (train_objective takes it again, re-entrantly)
        return _run_train_locked(args, run)


def _run_train_locked(args: argparse.Namespace, run: RunDir) -> int:
    run_dir = run.path
    resume = bool(getattr(args, "resume", False))
    saved = _resumed_settings(run, args.objective) if resume else None
    has_run = run.final_dir.exists() or run.checkpoints_dir.exists()
    if has_run and not resume and not args.overwrite:
        raise ValueError(f"run dir {run_dir} already holds a trained model or checkpoints; pass --resume to "
                         "continue it, --overwrite to start again, or --name/--run-dir for a new run")
    data_path = one_data_path(args.data) if args.data or saved is None else saved["data"]
    tokenizer = args.tokenizer or (saved["tokenizer"] if saved is not None else None)
    if args.objective == "mlm":
        data = load_corpus(data_path, args.cache_dir, tokenizer or "byte")
        base_vocab, source = data.vocab_size, data.source
    elif args.objective == "seq2seq":
        base_vocab = 256
        _, tc_probe = build_objective_configs(args, base_vocab, saved)
        data = pair_data(data_path, tokenizer, tc_probe.seq_len, SpecialTokens(base_vocab, with_eos=True))
        source = data.source
    else:
        base_vocab = 256
        cfg_probe, tc_probe = build_objective_configs(args, base_vocab, saved)
        data = classification_data(data_path, tokenizer, tc_probe.seq_len, SpecialTokens(base_vocab),
                                   cfg_probe.n_labels)
        source = data.source
    cfg, tc = build_objective_configs(args, base_vocab, saved)
    if args.objective == "classify" and data_path is not None and saved is None:  # the file's labels
        cfg = cfg.replace(n_labels=len(data.labels))
    if saved is not None and saved["labels"] is not None and getattr(data, "labels", None) != saved["labels"]:
        raise ValueError(f"the data's labels {data.labels[:8]} are not the ones the run in {run_dir} was trained "
                         f"on ({saved['labels'][:8]})")
    if cfg.vocab_size != SpecialTokens(base_vocab, with_eos=args.objective == "seq2seq").vocab_size:
        raise ValueError(f"the data's tokenizer ({tokenizer or 'byte'}, {base_vocab} tokens) does not fit the model "
                         f"of {run_dir} (vocab_size {cfg.vocab_size}); pass the --tokenizer it was trained with")
    if has_run and not resume:  # --overwrite, once the data and configs have been checked
        for folder in (run.final_dir, run.checkpoints_dir):
            shutil.rmtree(folder, ignore_errors=True)
    result = train_objective(args.objective, cfg, tc, data, run_dir, data_path=data_path,
                             tokenizer=tokenizer or "byte", resume=resume,
                             progress=not getattr(args, "no_progress", True),
                             check_memory=not getattr(args, "force", False))
    note_missing_tensorboard(tc)
    return _print_summary(args, result, data, source, base_vocab, tc, run_dir)


def _print_summary(args: argparse.Namespace, result, data, source: str, base_vocab: int, tc: TrainConfig,
                   run_dir: Path) -> int:
    """What the run did, its objective's final metric beside a baseline, where it wrote; the exit
    code (130 when interrupted)."""
    print(f"data: {source}")
    print(f"model: {type(result.model).__name__}, {result.model.num_parameters():,} parameters, "
          f"router={result.model.config.router}, ffn={result.model.config.ffn}")
    print(f"steps: {result.steps} of {tc.max_steps} in {result.seconds:.0f} s")
    if result.interrupted:
        print(f"interrupted at step {result.steps}; continue with: gohgraph train --objective {args.objective} "
              f"--resume --run-dir {run_dir}")
        print(f"checkpoint: {result.checkpoint_path}")
        return 130
    if args.objective == "mlm":
        entropy = unigram_entropy(data.train, base_vocab)
        print(f"validation MLM loss: {result.metrics['loss']:.4f} nats/token at {result.metrics['examples']:,.0f} "
              f"masked validation positions "
              f"(unigram entropy of the training split: {entropy:.4f}; uniform: {math.log(base_vocab):.4f})")
    elif args.objective == "seq2seq":
        print(seq2seq_summary(result.metrics))
    else:
        print(f"validation accuracy: {result.metrics['accuracy']:.4f} over {result.metrics['examples']:,.0f} "
              f"validation texts of {len(data.labels)} classes ({', '.join(data.labels[:20])}); "
              f"majority class: {data.majority_accuracy():.4f}")
    print(f"final model: {result.final_path}")
    print(f"metrics: {result.metrics_path}")
    return 0


def _resumed_settings(run: RunDir, objective: str) -> dict:
    """What a resumed run continues: its latest checkpoint's model and train configs, and the data
    and labels of its ``objective.json``."""
    checkpoint = run.latest_checkpoint()
    if checkpoint is None:
        raise ValueError(f"nothing to resume: {run.path} holds no checkpoint; drop --resume to start a new run")
    settings = read_json(run.objective_file)
    if settings.get("objective") != objective:
        raise ValueError(f"{run.path} is an --objective {settings.get('objective')} run; resume it with that objective")
    state = read_json(checkpoint / TRAINING_STATE)
    return {"model": read_config(checkpoint).to_dict(), "train": state["train_config"],
            "data": settings.get("data"), "labels": settings.get("labels"), "tokenizer": settings.get("tokenizer")}


def run_eval(args: argparse.Namespace, model, directory: Path, run_dir: Path) -> int:
    """``gohgraph eval`` of a run trained with ``--objective mlm|classify|seq2seq``: its validation
    split, on CPU, as the run evaluated itself."""
    settings = read_json(RunDir(run_dir).objective_file)
    objective, seq_len = settings["objective"], args.seq_len or settings["seq_len"]
    if getattr(args, "split", "val") != "val":
        raise ValueError(f"--split {args.split}: an --objective {objective} run is scored on its validation split")
    if str(getattr(args, "device", "cpu")) != "cpu":
        raise ValueError(f"--device {args.device}: an --objective {objective} run is evaluated on CPU, "
                         "where it trained")
    if getattr(args, "cache_dir", None) is not None and objective != "mlm":
        raise ValueError(f"--cache-dir: an --objective {objective} run reads its texts as bytes and keeps no token "
                         "cache")
    special = SpecialTokens.of_model(model.config)
    data_path = one_data_path(args.data) or settings.get("data")
    if objective == "mlm":
        data = load_corpus(data_path, args.cache_dir, args.tokenizer or settings.get("tokenizer") or "byte")
    elif objective == "seq2seq":
        data = pair_data(data_path, args.tokenizer, seq_len, special)
    else:
        data = classification_data(data_path, args.tokenizer, seq_len, special, model.config.n_labels)
        if settings.get("labels") is not None and data.labels != settings["labels"]:
            raise ValueError(f"the data's labels {data.labels[:8]} are not the ones {directory} was trained on "
                             f"({settings['labels'][:8]})")
    metrics = evaluate_objective(model, objective, data, args.batch_size, seq_len, args.max_batches)
    result = {"checkpoint": str(directory), "objective": objective, **metrics}
    if args.json:
        print(json.dumps(result))
    elif objective == "seq2seq":
        print(f"{directory}: seq2seq {seq2seq_summary(metrics)}")
    else:
        print(f"{directory}: {objective} " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def seq2seq_summary(metrics: dict) -> str:
    """One line of the seq2seq metrics, the copy baseline beside the token accuracy."""
    return (f"validation loss {metrics['loss']:.4f} nats/token, token accuracy {metrics['token_accuracy']:.4f} "
            f"(copy baseline {metrics['copy_token_accuracy']:.4f}), exact match {metrics['exact_match']:.4f} "
            f"over {metrics['examples']:,.0f} pairs ({metrics['tokens']:,.0f} target tokens)")


def pair_data(data_path: Optional[str], tokenizer: Optional[str], seq_len: int,
              special: SpecialTokens) -> EncodedPairs:
    """Pair files at ``data_path`` (else the standard library's docstring -> def line pairs) as byte
    tokens, each side cut to ``seq_len``, targets ended by ``special.eos``."""
    if tokenizer not in (None, "byte"):
        raise ValueError(f"--tokenizer {tokenizer} is not supported with --objective seq2seq; its texts are "
                         "byte tokens")
    return encode_pair_data(load_pair_data(data_path), ByteTokenizer().encode, seq_len, special.pad, special.eos)


def one_data_path(values) -> Optional[str]:
    """The one ``--data`` path of an encoder objective (``None`` without the flag)."""
    settings = parse_data_flags(values)
    if "sources" in settings:
        raise ValueError("--objective mlm|classify|seq2seq reads one --data path (a file, directory or glob); "
                         "named sources (NAME=PATH) are for --objective lm")
    return settings.get("data")


def classification_data(data_path: Optional[str], tokenizer: Optional[str], seq_len: int, special: SpecialTokens,
                        n_labels: int):
    """Labelled files at ``data_path`` (byte tokens), else the standard library's package snippets."""
    if tokenizer not in (None, "byte"):
        raise ValueError(f"--tokenizer {tokenizer} is not supported with --objective classify; its texts are "
                         "byte tokens")
    if data_path is None:
        return stdlib_package_snippets(seq_len, special.cls, special.pad, n_labels)
    return labelled_file_data(data_path, seq_len, special.cls, special.pad, ByteTokenizer().encode)
