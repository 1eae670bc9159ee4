"""The ``gohgraph`` command line: a thin dispatcher over ``gohgraph.cli.<name>``.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int`` and calls library
functions that the tests cover; nothing here holds logic of its own.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "train": "train a graph-routed language model",
    "eval": "evaluate a checkpoint on validation data",
    "generate": "sample text from a checkpoint",
    "stats": "routing statistics of a checkpoint over data",
    "viz": "draw routing graphs, load heatmaps, token traces and training curves",
    "bench": "compare dense, MoH, GoH and expert variants at matched size",
    "convert": "convert a Hugging Face Llama / GPT-2 checkpoint into a GoH model",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gohgraph", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = _command_module(name)
        if module is None:
            continue
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def _command_module(name: str):
    try:
        return importlib.import_module(f"gohgraph.cli.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"gohgraph.cli.{name}":
            return None  # command not built into this version
        raise


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # user errors: one clear line, no traceback
        print(f"gohgraph {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
