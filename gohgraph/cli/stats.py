"""``gohgraph stats``: routing statistics of a checkpoint over validation data.

    gohgraph stats --checkpoint runs/x/final --out stats.json [--data PATH] [--batches 20]
                   [--batch-size 8] [--seq-len 256] [--csv stats.csv] [--compare runs/y/final]
    gohgraph stats --checkpoint runs/mix --out stats.json --by-source [--data code=src/ --data prose=books/]
    gohgraph stats --checkpoint runs/t5/final --out stats.json --data pairs.tsv   # seq2seq: source<TAB>target

Writes the :meth:`~gohgraph.analysis.stats.collect.RoutingStats.report` as JSON (plus routing drift against
``--compare``), optionally the long CSV, and prints one summary line per layer. ``--by-source``
runs ``--batches`` batches of every source's validation split (the ``--data NAME=PATH`` flags, or
the sources the run was trained on) and adds the ``by_source`` section: head activation, gate mass,
expert load and the specialisation of every head and expert, per source and layer. A seq2seq
checkpoint reads ``--data`` as a file of ``source<TAB>target`` pairs
(:mod:`gohgraph.cli.seq2seq_batches`) and reports each attention kind (encoder, decoder_self,
cross) in its own section, ``report["kinds"]``. A decoder's report adds ``logit_lens``: per layer
and head, the :data:`LENS_TOP_K` tokens its output promotes through the unembedding (direct logit
attribution, :mod:`gohgraph.analysis.logit_lens`; a second pass over the same batches), and with
expert layers ``expert_logit_lens``: per layer and routed expert, the tokens its gate-weighted
output promotes (a third pass).

The report's ``layers`` carry each layer's co-activation P(b | a) (``coactivation_given``, heads and
experts) and ``vocabulary`` the vocabulary specialisation by input and predicted token
(:mod:`gohgraph.analysis.stats.vocabulary`; rows in ``--csv`` too). When the checkpoint belongs to a
run that kept at least two models (``checkpoints/step_*``, kept by ``--set keep_last=N`` at every
``save_every``, and ``final/``), a decoder's report adds ``saturation``: per kept checkpoint and
layer, the share of the newest model's top-k head and expert choices it already makes on the first
:data:`SATURATION_BATCHES` validation batches (:mod:`gohgraph.analysis.saturation`), drawn in
``<out>_saturation.png`` beside the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator

from .common import (
    add_data_arguments,
    add_overwrite_argument,
    load_model,
    prepare_output,
    source_validation_batches,
    validation_batches,
)
from .routing_data import SATURATION_BATCHES, kept_models, saturation_over_run, saturation_supported

# tokens listed per head in the report's ``logit_lens`` section (gohgraph.analysis.logit_lens)
LENS_TOP_K = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (its newest checkpoint is used) or checkpoint directory")
    parser.add_argument("--out", required=True, help="where to write the statistics JSON")
    add_data_arguments(parser, default_batches=20)
    parser.add_argument("--csv", default=None, help="also write the statistics as a long CSV table")
    parser.add_argument("--compare", default=None, metavar="CHECKPOINT",
                        help="also report routing drift: the share of tokens whose active heads/experts "
                             "differ from this checkpoint")
    parser.add_argument("--by-source", action="store_true",
                        help="routing per data source, with a specialisation score per head and expert")
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ..analysis.logit_lens import (
        collect_expert_logit_lens,
        collect_logit_lens,
        expert_lens_supported,
        lens_supported,
    )
    from ..analysis.stats.collect import collect_routing_stats, collect_routing_stats_by_source
    from ..analysis.stats.drift import routing_drift

    out = prepare_output(Path(args.out), args.overwrite, is_directory=False)
    if args.csv:
        prepare_output(Path(args.csv), args.overwrite, is_directory=False)
    model, checkpoint = load_model(args.checkpoint)
    kept, newest = kept_models(checkpoint) if saturation_supported(model) else ([], None)
    picture = out.with_name(out.stem + "_saturation.png")
    if kept:  # refused before any statistics when the picture may not be written
        prepare_output(picture, args.overwrite, is_directory=False)
    family = model.config.model_type
    if family == "seq2seq" and (args.by_source or args.compare):
        raise ValueError("--by-source and --compare are not available for a seq2seq checkpoint yet")
    other = None
    if args.compare:  # read, and its family checked, before the statistics
        other, _ = load_model(args.compare, families=(family,),
                              purpose=f"be compared with the {family} model of --checkpoint (--compare)")
    if family == "seq2seq":
        stats = collect_seq2seq_stats(args, model, checkpoint)
        batches = None
    elif args.by_source:
        by_source, tokenizer = source_validation_batches(args, model, checkpoint)
        stats = collect_routing_stats_by_source(model, by_source, progress=not args.no_progress)
        batches = [batch for source_batches in by_source.values() for batch in source_batches]
    else:
        batches, tokenizer = validation_batches(args, model, checkpoint)
        stats = collect_routing_stats(model, batches, progress=not args.no_progress)
    report = stats.report()
    if batches is not None and lens_supported(model):
        report["logit_lens"] = collect_logit_lens(model, batches, top_k=LENS_TOP_K, tokenizer=tokenizer)
    if batches is not None and expert_lens_supported(model):
        report["expert_logit_lens"] = collect_expert_logit_lens(model, batches, top_k=LENS_TOP_K, tokenizer=tokenizer)
    if other is not None:
        report["drift"] = {"against": str(args.compare), **routing_drift(model, other, batches)}
    if kept:
        report["saturation"] = saturation_over_run(kept, newest, batches[:SATURATION_BATCHES])
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.csv:
        stats.to_csv(args.csv)
    if kept:
        from ..viz import saturation_figure

        saturation_figure(report["saturation"], picture)
    for line in summary_lines(report):
        print(line)
    print(f"wrote {out}" + (f" and {args.csv}" if args.csv else "") + (f" and {picture}" if kept else ""))
    return 0


def collect_seq2seq_stats(args: argparse.Namespace, model, checkpoint):
    """A seq2seq checkpoint's :class:`~gohgraph.analysis.stats.kinds.KindRoutingStats` over its ``--data`` pairs."""
    from ..analysis.stats.kinds import collect_routing_stats_by_kind
    from .seq2seq_batches import seq2seq_validation_batches

    batches, _ = seq2seq_validation_batches(args, model, checkpoint)
    return collect_routing_stats_by_kind(model, batches, progress=not args.no_progress)


def summary_lines(report: dict) -> Iterator[str]:
    """One human-readable line per layer, then the drift if measured; per attention kind for seq2seq."""
    if "kinds" in report:
        tokens = report["tokens"]
        yield (f"routing statistics over {tokens['source']} source and {tokens['target']} target tokens "
               f"({report['batches']} batches)")
        for kind, kind_report in report["kinds"].items():
            for line in list(summary_lines(kind_report))[1:]:
                yield f"{kind} {line}"
        return
    yield f"routing statistics over {report['tokens']} tokens ({report['batches']} batches)"
    for layer in report["layers"]:
        heads = layer["heads"]
        line = f"layer {layer['layer']}: {heads['active_per_token']:.2f} active heads/token"
        if "load_cv" in heads:
            line += f", head load CV {heads['load_cv']:.3f} entropy {heads['load_entropy']:.3f}"
        line += f", dead heads {heads['dead']}"
        experts = layer.get("experts")
        if experts is not None:
            line += (f" | experts: load CV {experts['load_cv']:.3f} entropy {experts['load_entropy']:.3f} "
                     f"max/mean {experts['max_over_mean_load']:.2f} dead {experts['dead']}")
            if "drop_rate" in experts:
                line += f" drop rate {experts['drop_rate']:.3%}"
        yield line
    for pair in report.get("cross_layer", []):
        line = f"layers {pair['layers'][0]}->{pair['layers'][1]}:"
        for kind in ("heads", "experts"):
            section = pair.get(kind)
            if section is not None and section["top_successor_share"] is not None:
                line += (f" {kind} follow their top successor {section['top_successor_share']:.1%} "
                         f"(independent: {section['top_successor_share_if_independent']:.1%});")
        yield line.rstrip(";")
    by_source = report.get("by_source")
    if by_source is not None:
        yield "tokens per source: " + ", ".join(f"{name} {n}" for name, n in by_source["tokens"].items())
        for layer in by_source["layers"]:
            kind = "experts" if "experts" in layer else "heads"
            picks = []
            for source, scores in layer[kind]["specialisation"].items():
                known = [(score, node) for node, score in enumerate(scores) if score is not None]
                if known:
                    score, node = max(known)
                    picks.append(f"{source} -> {kind[:-1]} {node} ({score:.2f}x)")
            yield f"layer {layer['layer']} most specialised {kind[:-1]} per source: " + ", ".join(picks)
    saturation = report.get("saturation")
    if saturation is not None:
        parts = []
        for entry in saturation["checkpoints"]:
            kinds = [f"{kind} {entry[kind]:.1%}" for kind in ("heads", "experts") if entry[kind] is not None]
            parts.append(f"step {entry['step']} " + " ".join(kinds))
        yield "router saturation vs the newest model: " + "; ".join(parts)
    drift = report.get("drift")
    if drift is not None:
        yield (f"routing drift vs {drift['against']}: {drift['token_drift']:.1%} of tokens change route "
               f"(head drift per layer {[round(layer['head_drift'], 3) for layer in drift['layers']]})")
