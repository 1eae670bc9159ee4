"""``gohgraph eval``: a checkpoint's loss and scores on validation (or, for ``lm``, training) data.

Defaults come from the run the checkpoint belongs to (its task, data, tokenizer and ``seq_len``),
so ``gohgraph eval --checkpoint runs/tiny`` evaluates on the data it was trained on, by its task's
own evaluation (:meth:`~gohgraph.training.tasks.base.Task.evaluate`): next-token loss for ``lm``,
masked-LM loss, accuracy, or the seq2seq scores.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..data.sources import MixedCorpus, load_training_data, parse_data_flags
from ..data.tokenizers import TOKENIZER_FILE
from ..training.config import TrainConfig
from ..training.run_dir import RunDir
from ..training.tasks import get_task
from ..training.tasks.lm import evaluate, evaluate_sources
from .common import find_run_file, load_model, run_dir_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="run directory, checkpoint directory or save_pretrained directory")
    parser.add_argument("--data", action="append", default=None, metavar="[NAME=]PATH[:WEIGHT]",
                        help="text file, directory or glob (default: the run's data); repeat as NAME=PATH "
                             "to score several sources, each alone")
    parser.add_argument("--tokenizer", help="byte, bpe, bpe:<vocab> or file:<tokenizer.json> (default: the run's; "
                                            "an --objective run's saved tokenizer.json)")
    parser.add_argument("--cache-dir", type=Path, help="token cache (default $GOHGRAPH_CACHE or ~/.cache/gohgraph)")
    parser.add_argument("--split", choices=["val", "train"], default="val", help="which split to score (default: val)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, help="default: the run's seq_len, else min(256, max_seq_len)")
    parser.add_argument("--max-batches", type=int, default=50,
                        help="score at most this many batches from the start of the split (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    model, directory = load_model(args.checkpoint, args.device)
    run_dir = run_dir_of(directory)
    run = RunDir(run_dir) if run_dir is not None else None
    if run is not None and run.is_objective_run():  # a run of another task than lm
        return run_task_eval(args, model, directory, run)
    if not isinstance(model, get_task("lm").model_class):  # the next-token loss below is a decoder's
        raise ValueError(f"{directory} holds a model_type={model.config.model_type!r} model outside a gohgraph train "
                         "--objective run (no objective.json beside it); eval scores a decoder's next-token loss, "
                         "or an objective run's own metric")
    data_settings = run.read_data_settings() if run else {}
    train_settings = run.read_train_config() if run else {}
    settings = parse_data_flags(args.data) if args.data else data_settings
    settings = {**settings, "tokenizer": args.tokenizer or data_settings.get("tokenizer", "byte")}
    corpus = load_training_data(settings, args.cache_dir)
    if corpus.vocab_size > model.config.vocab_size:
        raise ValueError(f"the data's tokenizer has {corpus.vocab_size} tokens; the model only "
                         f"{model.config.vocab_size} (pass the tokenizer the model was trained with)")
    seq_len = args.seq_len or train_settings.get("seq_len") or min(256, model.config.max_seq_len)
    per_source = {}
    if isinstance(corpus, MixedCorpus):  # each source scored alone; the loss is over all their windows
        splits = {s.name: s.corpus.val if args.split == "val" else s.corpus.train for s in corpus.sources}
        loss, per_source = evaluate_sources(model, splits, args.batch_size, seq_len, args.max_batches)
    else:
        loss = evaluate(model, corpus.val if args.split == "val" else corpus.train, args.batch_size, seq_len,
                        args.max_batches)
    result = {"checkpoint": str(directory), "split": args.split, "loss": loss, "perplexity": math.exp(loss),
              "bits_per_token": loss / math.log(2), "seq_len": seq_len, "data": corpus.source}
    if per_source:
        result["loss_by_source"] = per_source
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{directory}: {args.split} loss {loss:.4f} nats/token, perplexity {math.exp(loss):.2f}, "
              f"{loss / math.log(2):.3f} bits/token ({corpus.source})")
        for name, value in per_source.items():
            print(f"  {name}: {args.split} loss {value:.4f} nats/token")
    return 0


def run_task_eval(args: argparse.Namespace, model, directory: Path, run: RunDir) -> int:
    """``gohgraph eval`` of a run trained with ``--objective mlm|classify|seq2seq``: its task's
    evaluation on the validation split, as the run evaluated itself."""
    settings = run.read_objective()
    task = get_task(settings["objective"])
    if args.split != "val":
        raise ValueError(f"--split {args.split}: an --objective {task.name} run is scored on its validation split")
    if args.cache_dir is not None and not task.token_cache:
        raise ValueError(f"--cache-dir: an --objective {task.name} run tokenizes its texts in memory and keeps no "
                         "token cache")
    data_settings = run.read_data_settings(default={"data": settings.get("data"),
                                                    "tokenizer": settings.get("tokenizer") or "byte"})
    if args.data:
        data_settings = {**parse_data_flags(args.data), "tokenizer": data_settings.get("tokenizer", "byte")}
    saved_tokenizer = find_run_file(directory, TOKENIZER_FILE)
    if args.tokenizer is not None:
        data_settings["tokenizer"] = args.tokenizer
    elif saved_tokenizer is not None:  # the tokenizer the model was trained with, not a BPE trained again
        data_settings["tokenizer"] = f"file:{saved_tokenizer}"
    tc = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len or settings["seq_len"], device=args.device)
    data = task.load_data(data_settings, args.cache_dir, tc, model.config)
    task.check_model_fits(model.config, data, tc)
    task.check_same_data(settings, data, str(directory))
    metrics = task.evaluate(model, data, tc, args.max_batches)
    result = {"checkpoint": str(directory), "objective": task.name, **metrics}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{directory}: {task.name} " + "; ".join(task.summary(metrics, data, model.config)))
    return 0
