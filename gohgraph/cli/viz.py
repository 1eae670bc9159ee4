"""``gohgraph viz``: every routing picture of a checkpoint.

    gohgraph viz --checkpoint runs/x/final --out pictures/ [--text "def f(x):"] [--data PATH]
                 [--batches 10] [--batch-size 8] [--seq-len 256] [--metrics runs/x/metrics.csv]

Runs the model over validation data for the statistics (by source, with the specialisation
heatmap, when the run was trained on several ``--data NAME=PATH`` sources or they are given here),
then writes the routing graphs, load heatmaps, cross-layer transitions, load percentiles, a token trace (of ``--text``, or the start of the validation text), the training curves
when a ``metrics.csv`` is found (in the checkpoint directory or up to two parents), the GraphML
routing graph and the statistics JSON. A seq2seq checkpoint reads ``--data`` as a file of
``source<TAB>target`` pairs and gets every per-statistics picture once per attention kind
(``routing_graphs_encoder.png``, ``..._decoder_self``, ``..._cross``; no token trace).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..models.families import family_of
from .common import (
    add_data_arguments,
    add_overwrite_argument,
    check_text_tokens,
    check_utf8,
    load_model,
    prepare_output,
)
from .routing_data import DEFAULT_TRACE_TOKENS, collect_stats, metrics_file

DEFAULT_TEXT_LIMIT = 64  # the most tokens of a --text, without --trace-tokens
MAX_TRACE_TOKENS = 512  # one labelled column per token: wider pictures cannot be read
STATS_FILE = "stats.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (its newest checkpoint is used) or checkpoint directory")
    parser.add_argument("--out", required=True, help="directory for the pictures (new, or --overwrite)")
    parser.add_argument("--text", default=None, help="text whose per-token routing to draw "
                                                      "(default: the start of the validation text)")
    parser.add_argument("--metrics", default=None,
                        help="metrics CSV for the training curves (default: metrics.csv near the checkpoint)")
    parser.add_argument("--trace-tokens", type=int, default=None,
                        help=f"most tokens the token trace draws; a longer --text is refused (default: "
                             f"{DEFAULT_TEXT_LIMIT} for --text, else the first {DEFAULT_TRACE_TOKENS} validation "
                             f"tokens; at most {MAX_TRACE_TOKENS} and the model's max_seq_len)")
    add_data_arguments(parser, default_batches=10)
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from .. import viz
    from ..analysis.stats.collect import collect_routing_stats, collect_routing_stats_by_source

    check_utf8(args.text, "--text")
    out = prepare_output(Path(args.out), args.overwrite, is_directory=True,
                         replaces=(*viz.PICTURE_FILES, STATS_FILE))
    model, checkpoint = load_model(args.checkpoint)
    trace_tokens = check_trace_flags(args, model, checkpoint)
    metrics = metrics_file(args, checkpoint)
    stats, batches, tokenizer = collect_stats(args, model, checkpoint, collect_routing_stats,
                                              collect_routing_stats_by_source)
    text = args.text
    if text is None and not family_of(model.config).several_routing_kinds:  # one kind: one token trace
        text = tokenizer.decode(batches[0][0, :args.trace_tokens or DEFAULT_TRACE_TOKENS].tolist())
    written = viz.write_all_pictures(model, stats, out, text=text, metrics_csv=metrics,
                                     encode=tokenizer.encode, decode=tokenizer.decode, trace_tokens=trace_tokens)
    written.append(stats.to_json(out / STATS_FILE))
    for path in written:
        print(f"wrote {path}")
    if metrics is None:
        print("no metrics.csv found near the checkpoint: training curves skipped")
    return 0


def check_trace_flags(args: argparse.Namespace, model, checkpoint: Path) -> int:
    """The token trace's ``--trace-tokens`` limit, after checking it and ``--text`` against the model,
    before the statistics are collected."""
    cfg = model.config
    if family_of(cfg).several_routing_kinds:
        given = [flag for flag, value in (("--text", args.text), ("--trace-tokens", args.trace_tokens))
                 if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)}: a seq2seq checkpoint's pictures have no token trace (the "
                             "routing of its three attention kinds is drawn per kind); drop the flag")
        return DEFAULT_TEXT_LIMIT
    most = min(MAX_TRACE_TOKENS, cfg.max_seq_len)
    if args.trace_tokens is not None and not 1 <= args.trace_tokens <= most:
        raise ValueError(f"--trace-tokens {args.trace_tokens} must be in [1, {most}] (min of {MAX_TRACE_TOKENS}, "
                         f"the widest readable trace, and the model's max_seq_len={cfg.max_seq_len})")
    limit = min(args.trace_tokens or DEFAULT_TEXT_LIMIT, cfg.max_seq_len)
    if args.text is not None:
        check_text_tokens(args.text, "--text", checkpoint, limit, "the token trace draws (--trace-tokens)")
    return limit


