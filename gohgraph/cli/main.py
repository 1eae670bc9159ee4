"""The ``gohgraph`` command line: a thin dispatcher over ``gohgraph.cli.<name>``.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int`` and calls library
functions that the tests cover; nothing here holds logic of its own. Every error a user can cause
(a bad value, a missing or unwritable path, a file where a folder should be, no CUDA) ends the
command with one line on stderr and exit code 1, never a traceback; Ctrl-C ends it with 130. A
command line argparse cannot read (an unknown flag, a choice not offered, ``abc`` for a number)
exits 2, argparse's convention, also with one line (:class:`OneLineParser`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

EXIT_USER_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

COMMANDS = {
    "train": "train a graph-routed language model (checkpoints, metrics, resumable)",
    "eval": "loss of a checkpoint or run on validation data",
    "generate": "sample text from a checkpoint or run",
    "stats": "routing statistics of a checkpoint or run over data (JSON, CSV)",
    "ablate": "Δ validation loss with each head / expert forced off or on, top-k cut, the router's messages removed",
    "viz": "routing graphs, load heatmaps, token traces and training curves of a checkpoint or run",
    "report": "one self-contained HTML file of a run: curves, routing graphs, heatmaps, sources, token routing",
    "bench": "compare dense, MoH, GoH and expert variants at matched size",
    "convert": "convert a Hugging Face Llama / GPT-2 / Mixtral / Qwen2-MoE checkpoint into a GoH model",
}
DESCRIPTION = """\
Graph-of-Heads transformers: attention heads and feed-forward experts are nodes of a small graph,
and a learned message-passing router decides per token which heads are active, how they exchange
information, and which experts each sub-token reaches.

Start with:  gohgraph train --preset tiny --max-steps 50      (the default corpus needs no download)
Then:        gohgraph viz --checkpoint runs/default --out pictures
Every command takes --help. Commands that read a model accept a run directory or a checkpoint."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr, exit code 2 (argparse's), naming
    the command's ``--help`` instead of printing its whole usage block."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    parser = OneLineParser(prog="gohgraph", description=DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"gohgraph {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, help_text in COMMANDS.items():
        module = _command_module(name)
        if module is None:
            continue
        sub = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
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
    except KeyboardInterrupt:
        print(f"gohgraph {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, ImportError) as err:  # user errors: one clear line, no traceback
        return _error(args.command, str(err))
    except OSError as err:  # a missing or unwritable path, a file where a folder should be
        where = f"{err.filename}: " if err.filename else ""
        return _error(args.command, f"{where}{err.strerror or err}")


def _error(command: str, message: str) -> int:
    print(f"gohgraph {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
