"""What ``gohgraph viz`` and ``gohgraph report`` share: a checkpoint's routing statistics over its
data (by source, or per attention kind for seq2seq) and the run's training-curve file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ..models.families import family_of
from ..training.run_dir import RunDir
from .common import find_run_file, run_sources, source_validation_batches, validation_batches

DEFAULT_TRACE_TOKENS = 48  # of the validation text, without --text


def metrics_file(args: argparse.Namespace, checkpoint: Path) -> Optional[Path]:
    """``--metrics``, else the run's ``metrics.csv``, checked (:func:`check_metrics_csv`); ``None`` without one."""
    from ..training.metrics import check_metrics_csv

    metrics = Path(args.metrics) if args.metrics else find_run_file(checkpoint, RunDir.METRICS)
    if metrics is None:
        return None
    if not metrics.is_file():
        raise FileNotFoundError(f"--metrics {metrics} does not exist")
    bad = check_metrics_csv(metrics)
    if bad:
        print(f"note: {metrics}: {bad}; the training curves leave out what cannot be read", file=sys.stderr)
    return metrics


def collect_stats(args: argparse.Namespace, model, checkpoint, collect, collect_by_source):
    """``(stats, batches, tokenizer)``: by source when named sources are known, else over ``--data``;
    a seq2seq checkpoint's per attention kind over its ``--data`` pairs."""
    if family_of(model.config).several_routing_kinds:
        from ..analysis.stats.kinds import collect_routing_stats_by_kind
        from .seq2seq_batches import seq2seq_validation_batches

        batches, tokenizer = seq2seq_validation_batches(args, model, checkpoint)
        return collect_routing_stats_by_kind(model, batches, progress=not args.no_progress), batches, tokenizer
    if run_sources(args, checkpoint):
        by_source, tokenizer = source_validation_batches(args, model, checkpoint)
        stats = collect_by_source(model, by_source, progress=not args.no_progress)
        return stats, [batch for batches in by_source.values() for batch in batches], tokenizer
    batches, tokenizer = validation_batches(args, model, checkpoint)
    return collect(model, batches, progress=not args.no_progress), batches, tokenizer
