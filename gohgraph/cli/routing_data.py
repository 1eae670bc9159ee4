"""What ``gohgraph viz``, ``stats`` and ``report`` share: a checkpoint's routing statistics over its
data (by source, or per attention kind for seq2seq), the run's training-curve file, and the router
saturation over the run's kept checkpoints."""

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


# ---------------------------------------------------------------------- router saturation over a run
# every kept checkpoint of the run runs on this many validation batches for the saturation section
SATURATION_BATCHES = 4


def saturation_supported(model) -> bool:
    """A decoder applying each block once, with routed heads or experts (what saturation measures)."""
    from ..analysis.ablation import check_ablatable

    try:
        check_ablatable(model)
    except ValueError:
        return False
    return True


def kept_models(checkpoint: Path) -> tuple:
    """``([(step, directory), ...], newest)`` of the run ``checkpoint`` belongs to: its kept
    ``checkpoints/step_*`` models, oldest first, and its newest model (``final/`` or the latest
    step), the reference; ``([], None)`` unless the run holds at least two models."""
    from ..storage import CONFIG_NAME
    from ..training.run_dir import STEP_DIR, RunDir

    run = RunDir.of_checkpoint(checkpoint)
    newest = None if run is None else run.newest_model()
    if newest is None:
        return [], None
    steps = [(int(STEP_DIR.match(path.name).group(1)), path) for path in run.step_dirs()
             if (path / CONFIG_NAME).is_file()]
    models = len(steps) + (newest not in [path for _, path in steps])
    return (steps, newest) if models >= 2 else ([], None)


def saturation_over_run(steps: list, newest: Path, batches) -> dict:
    """:func:`~gohgraph.analysis.saturation.routing_saturation` of every kept step against the
    newest model; ``final/`` itself is no entry (against itself it is 1), a newest step is one."""
    from ..analysis.saturation import routing_saturation
    from ..models.pretrained import from_pretrained

    final = from_pretrained(newest)
    print(f"saturation: {len(steps)} kept checkpoints against {newest}", file=sys.stderr)
    models = ((step, final if path == newest else from_pretrained(path)) for step, path in steps)
    result = routing_saturation(models, final, batches)
    for entry, (_, path) in zip(result["checkpoints"], steps):
        entry["checkpoint"] = str(path)
    return {"reference": str(newest), **result}
