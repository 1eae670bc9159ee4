"""``gohgraph generate``: sample text from a checkpoint, with the tokenizer saved beside it."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..data.tokenizers import TOKENIZER_FILE, load_tokenizer
from ..models.decoder import GoHTransformer
from ..training.checkpoint import resolve_checkpoint
from .common import run_dir_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="run directory, checkpoint directory or save_pretrained directory")
    parser.add_argument("--prompt", default="def ", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    directory = resolve_checkpoint(args.checkpoint)
    model = GoHTransformer.from_pretrained(directory, map_location=args.device)
    tokenizer_home = directory if (directory / TOKENIZER_FILE).is_file() else (run_dir_of(directory) or directory)
    tokenizer = load_tokenizer(tokenizer_home)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError("--prompt must not be empty")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    room = model.config.max_seq_len - len(prompt_ids)
    if room < 1:
        raise ValueError(f"--prompt is {len(prompt_ids)} tokens; the model's max_seq_len is {model.config.max_seq_len}")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    ids = torch.tensor([prompt_ids], device=args.device)
    out = model.generate(ids, max_new_tokens=min(args.max_new_tokens, room), temperature=args.temperature,
                         top_k=args.top_k, generator=generator)
    print(tokenizer.decode(out[0].tolist()))
    return 0


