"""``gohgraph generate``: sample text from a checkpoint, with the tokenizer saved beside it.

A decoder continues ``--prompt``; a seq2seq checkpoint reads ``--prompt`` as its source and prints
the target it generates (:meth:`~gohgraph.models.seq2seq.GoHSeq2Seq.generate`), cut at its
end-of-sequence token: the one ``gohgraph train --objective seq2seq`` trained it with, or ``--stop``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from ..data.objectives import SpecialTokens
from ..data.tokenizers import TOKENIZER_FILE, load_tokenizer
from ..models.compile import CompileUnavailableWarning
from ..models.families import family_of, model_types
from .common import load_model, run_dir_of
from .seq2seq_batches import run_objective


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="run directory (its newest checkpoint is used), checkpoint or save_pretrained directory")
    parser.add_argument("--prompt", default="def ", help="text to continue (default: %(default)r)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add, >= 1 (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature, >= 0; 0 = greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=50,
                        help="sample among the k most likely tokens, >= 1 (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus sampling: the smallest set of tokens holding this probability, in (0, 1]")
    parser.add_argument("--stop", default=None, metavar="TEXT",
                        help="stop after this text (one token of the model's tokenizer, e.g. a newline)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each one-token decode step (eager, with one line saying why, where it cannot)")


def run(args: argparse.Namespace) -> int:
    model, directory = load_model(args.checkpoint, args.device,
                                  families=model_types(lambda family: family.generation is not None),
                                  purpose="generate text (an encoder scores or classifies; try gohgraph eval)")
    generation = family_of(model.config).generation
    tokenizer_home = directory if (directory / TOKENIZER_FILE).is_file() else (run_dir_of(directory) or directory)
    tokenizer = load_tokenizer(tokenizer_home)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError("--prompt must not be empty")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    room = generation.room(model.config, len(prompt_ids))
    if room < 1:
        raise ValueError(f"--prompt is {len(prompt_ids)} tokens; the model's max_seq_len is {model.config.max_seq_len}")
    if args.max_new_tokens > room:  # the model has no positions beyond max_seq_len: said, not silently cut
        print(f"note: --max-new-tokens {args.max_new_tokens} is more than the model's max_seq_len="
              f"{model.config.max_seq_len} leaves after {generation.output_start}; generating at most {room} tokens",
              file=sys.stderr)
    eos = None
    if args.stop is not None:
        stop_ids = tokenizer.encode(args.stop)
        if len(stop_ids) != 1:
            raise ValueError(f"--stop {args.stop!r} is {len(stop_ids)} tokens of this model's tokenizer; give one token")
        eos = stop_ids[0]
    elif generation.prompt_is_source and seq2seq_objective_run(directory):
        eos = SpecialTokens.of_model(model.config).eos
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    ids = torch.tensor([prompt_ids], device=args.device)
    compile_kwargs = {}
    if args.compile:
        if not generation.compiles_decode_step:
            raise ValueError("--compile compiles a decoder-only model's decode step; seq2seq models decode eagerly")
        compile_kwargs["compile"] = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompileUnavailableWarning)
        out = model.generate(ids, max_new_tokens=min(args.max_new_tokens, room), temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, eos_token_id=eos, generator=generator,
                             **compile_kwargs)
    fallbacks = [w for w in caught if issubclass(w.category, CompileUnavailableWarning)]
    for w in caught:  # other warnings as they would have been shown
        if not issubclass(w.category, CompileUnavailableWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if fallbacks:  # the fallback as the command's one line
        print(f"gohgraph generate: --compile: {fallbacks[0].message}", file=sys.stderr)
    if generation.prompt_is_source:  # the output is the target alone: printed without its start token
        print(seq2seq_text(out[0, generation.prefix_length(len(prompt_ids)):].tolist(), eos, tokenizer))
    else:  # the prompt and its continuation
        print(tokenizer.decode(out[0].tolist()))
    return 0


def seq2seq_text(ids, eos, tokenizer) -> str:
    """The generated target ``ids`` (after the start token) up to ``eos``, as text; ids past the
    tokenizer's vocabulary (the objective's special tokens) are left out."""
    if eos is not None and eos in ids:
        ids = ids[:ids.index(eos)]
    return tokenizer.decode([i for i in ids if i < tokenizer.vocab_size])


def seq2seq_objective_run(directory: Path) -> bool:
    """Whether ``directory`` was trained by ``gohgraph train --objective seq2seq`` (so its eos is known)."""
    return run_objective(directory).get("objective") == "seq2seq"


