"""``gohgraph report``: one self-contained HTML file of a run (opens from disk, no network).

    gohgraph report --checkpoint runs/x --out report.html [--text "def f(x):"] [--data NAME=PATH ...]
                    [--batches 10] [--batch-size 8] [--seq-len 256] [--metrics runs/x/metrics.csv]

Collects the routing statistics over validation data (by source when the run was trained on
several ``--data NAME=PATH`` sources or they are given here), then writes the page of
:func:`gohgraph.viz.html_report.html_report`: training curves, a routing graph per layer, load
heatmaps, cross-layer transitions, specialisation by source and a text box whose tokens show their
routing on hover. A seq2seq run gets the routing sections per attention kind, statistics over its
``--data`` pairs (default: the run's), and its first validation source in the text box.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..training.run_dir import RunDir
from .common import add_data_arguments, add_overwrite_argument, find_run_file, load_model, prepare_output
from .viz import DEFAULT_TRACE_TOKENS, collect_stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (its newest checkpoint is used) or checkpoint directory")
    parser.add_argument("--out", required=True, help="the HTML file to write (new, or --overwrite)")
    parser.add_argument("--text", default=None, help="text for the token box (default: the start of the "
                                                      "validation text)")
    parser.add_argument("--metrics", default=None,
                        help="metrics CSV for the training curves (default: metrics.csv near the checkpoint)")
    parser.add_argument("--title", default=None, help="page title (default: names the checkpoint)")
    add_data_arguments(parser, default_batches=10)
    add_overwrite_argument(parser)


def first_text_ids(batch) -> list:
    """Token ids of a batch's first text: a ``[batch, seq]`` row, or a seq2seq batch's first source
    without its padding."""
    if isinstance(batch, dict):
        ids, mask = batch["input_ids"][0], batch["attention_mask"][0]
        return ids[mask.bool()].tolist()
    return batch[0].tolist()


def run(args: argparse.Namespace) -> int:
    from .. import viz
    from ..analysis.stats.collect import collect_routing_stats, collect_routing_stats_by_source

    out = Path(args.out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--out {out} must end in .html")
    prepare_output(out, args.overwrite, is_directory=False)
    model, checkpoint = load_model(args.checkpoint)
    metrics = Path(args.metrics) if args.metrics else find_run_file(checkpoint, RunDir.METRICS)
    if metrics is not None and not metrics.is_file():
        raise FileNotFoundError(f"--metrics {metrics} does not exist")
    stats, batches, tokenizer = collect_stats(args, model, checkpoint, collect_routing_stats,
                                              collect_routing_stats_by_source)
    text = args.text if args.text is not None else tokenizer.decode(first_text_ids(batches[0])[:DEFAULT_TRACE_TOKENS])
    viz.write_html_report(out, model, stats, text=text, metrics_csv=metrics, encode=tokenizer.encode,
                          decode=tokenizer.decode, title=args.title or f"gohgraph routing report: {checkpoint}")
    print(f"wrote {out}" + ("" if metrics else " (no metrics.csv found near the checkpoint: no training curves)"))
    return 0
