"""``gohgraph report``: one self-contained HTML file of a run (opens from disk, no network).

    gohgraph report --checkpoint runs/x --out report.html [--text "def f(x):"] [--data NAME=PATH ...]
                    [--batches 10] [--batch-size 8] [--seq-len 256] [--metrics runs/x/metrics.csv]

Collects the routing statistics over validation data (by source when the run was trained on
several ``--data NAME=PATH`` sources or they are given here), then writes the page of
:func:`gohgraph.viz.html_report.html_report`: training curves, a routing graph per layer, load
heatmaps, cross-layer transitions, specialisation by source and a text box whose tokens show their
routing on hover. A seq2seq run gets the routing sections per attention kind, statistics over its
``--data`` pairs (default: the run's), and its first validation source in the text box.

A decoder's page also lists the tokens each head and expert promotes (the logit lenses of
:mod:`gohgraph.analysis.logit_lens`, over the same batches) and, when ``gohgraph ablate`` wrote its
``ablation.json`` into the run's (or the checkpoint's) ``ablation/`` folder, the Δ loss of every
unit: both appear on hover in the routing graphs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (
    add_data_arguments,
    add_overwrite_argument,
    check_text_tokens,
    check_utf8,
    load_model,
    prepare_output,
)
from .routing_data import (
    DEFAULT_TRACE_TOKENS,
    SATURATION_BATCHES,
    collect_stats,
    kept_models,
    metrics_file,
    saturation_over_run,
    saturation_supported,
)

LENS_TOP_K = 10  # tokens per unit the page keeps from each logit lens (hover lines show the first 5)


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
    from ..viz.html_report import MAX_REPORT_TOKENS

    out = Path(args.out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--out {out} must end in .html")
    check_utf8(args.text, "--text")
    prepare_output(out, args.overwrite, is_directory=False)
    model, checkpoint = load_model(args.checkpoint)
    if args.text is not None:  # before the statistics, which take most of the time
        check_text_tokens(args.text, "--text", checkpoint, min(MAX_REPORT_TOKENS, model.config.max_seq_len),
                          f"the report's text box shows (min of {MAX_REPORT_TOKENS} and the model's max_seq_len)")
    metrics = metrics_file(args, checkpoint)
    stats, batches, tokenizer = collect_stats(args, model, checkpoint, collect_routing_stats,
                                              collect_routing_stats_by_source)
    text = args.text if args.text is not None else tokenizer.decode(first_text_ids(batches[0])[:DEFAULT_TRACE_TOKENS])
    ablation, lenses = unit_analyses(model, checkpoint, batches)
    kept, newest = kept_models(checkpoint) if saturation_supported(model) else ([], None)
    saturation = saturation_over_run(kept, newest, batches[:SATURATION_BATCHES]) if kept else None
    viz.write_html_report(out, model, stats, text=text, metrics_csv=metrics, encode=tokenizer.encode,
                          decode=tokenizer.decode, title=args.title or f"gohgraph routing report: {checkpoint}",
                          ablation=ablation, logit_lens=lenses, saturation=saturation)
    print(f"wrote {out}" + ("" if metrics else " (no metrics.csv found near the checkpoint: no training curves)"))
    return 0


def unit_analyses(model, checkpoint: Path, batches) -> tuple:
    """``(ablation, logit_lens)`` for a decoder's page: ``gohgraph ablate``'s JSON found in the
    checkpoint's or its run's ``ablation/`` folder (``None`` if there is none), and the head and
    expert logit lenses over ``batches`` (``None`` for a model they do not cover)."""
    from ..analysis.ablation import ABLATION_DIR, JSON_FILE
    from ..analysis.logit_lens import (
        collect_expert_logit_lens,
        collect_logit_lens,
        expert_lens_supported,
        lens_supported,
    )
    from ..training.run_dir import RunDir

    heads_covered, experts_covered = lens_supported(model), expert_lens_supported(model)
    if not (heads_covered or experts_covered):
        return None, None
    lenses = {}
    if heads_covered:
        lenses["heads"] = collect_logit_lens(model, batches, top_k=LENS_TOP_K)
    if experts_covered:
        lenses["experts"] = collect_expert_logit_lens(model, batches, top_k=LENS_TOP_K)
    run = RunDir.of_checkpoint(checkpoint)
    folders = [Path(checkpoint)] + ([run.path] if run is not None else [])
    found = next((folder / ABLATION_DIR / JSON_FILE for folder in folders
                  if (folder / ABLATION_DIR / JSON_FILE).is_file()), None)
    if found is None:
        return None, lenses
    try:
        ablation = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{found} cannot be read as gohgraph ablate's JSON: {error}") from None
    measured_on = ablation.get("checkpoint") if isinstance(ablation, dict) else None
    note = "" if measured_on in (None, str(checkpoint)) else f" (measured on {measured_on})"
    print(f"ablation: {found}{note}", file=sys.stderr)
    return ablation, lenses
