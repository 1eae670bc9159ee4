"""``gohgraph ablate``: what each routed head, expert and the graph router's messages are worth.

    gohgraph ablate --checkpoint runs/x [--out ablation/] [--batches 4] [--data PATH] [--overwrite]

On ``--batches`` validation batches of a decoder checkpoint with routed heads or experts, the
change of the validation loss (Δ, nats per token) when each head is forced off (gate 0 for every
token) or on (gate 1), each expert is forced off (its sub-tokens take their next choice), top-k is
cut to k-1, k/2 and 1 at evaluation, and, for the graph router, its messages or its whole head
graph are removed; with the share of routing decisions that change
(:mod:`gohgraph.analysis.ablation`). Writes ``ablation.json``, ``ablation.csv`` (one row per
intervention: kind, layer, unit, delta_loss, changed_decisions) and ``ablation_heatmap.png``
(layers x heads Δ loss with each head forced off; layers x experts for an expert-only model) in
``--out``. Written into the run's ``ablation/`` folder (``--out runs/x/ablation``), they show up in
``gohgraph report`` of that run: Δ loss per unit, also on hover.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_data_arguments, add_overwrite_argument, load_model, prepare_output, validation_batches


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (its newest checkpoint is used) or checkpoint directory of a decoder")
    parser.add_argument("--out", default="ablation",
                        help="directory for ablation.json, ablation.csv and ablation_heatmap.png (default: %(default)s)")
    add_data_arguments(parser, default_batches=4)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ..analysis.ablation import CSV_FILE, HEATMAP_FILE, JSON_FILE, ablate, check_ablatable
    from ..viz import ablation_heatmap

    out = prepare_output(Path(args.out), args.overwrite, is_directory=True,
                         replaces=(JSON_FILE, CSV_FILE, HEATMAP_FILE))
    model, checkpoint = load_model(args.checkpoint, args.device, families=("decoder",),
                                   purpose="be ablated (ablate runs a decoder's next-token loss)")
    check_ablatable(model)
    batches, _ = validation_batches(args, model, checkpoint)
    device = next(model.parameters()).device
    report = ablate(model, [batch.to(device) for batch in batches], progress=None if args.no_progress else _progress)
    (out / JSON_FILE).write_text(json.dumps({"checkpoint": str(checkpoint), **report.to_dict()}, indent=2) + "\n",
                                 encoding="utf-8")
    report.write_csv(out / CSV_FILE)
    ablation_heatmap(report, out / HEATMAP_FILE,
                     kind="head_off" if any(row.kind == "head_off" for row in report.rows) else "expert_off")
    print(f"baseline validation loss {report.baseline_loss:.4f} nats/token over {report.tokens} tokens; "
          f"{len(report.rows)} interventions")
    for row in sorted(report.rows, key=lambda row: -row.delta_loss)[:5]:
        where = "every layer" if row.layer is None else f"layer {row.layer}"
        print(f"  {row.kind} {row.unit} ({where}): Δ loss {row.delta_loss:+.4f}")
    print(f"wrote {out / JSON_FILE}, {out / CSV_FILE} and {out / HEATMAP_FILE}")
    return 0


def _progress(done: int, total: int) -> None:
    print(f"\rablate: {done}/{total} interventions", end="\n" if done == total else "", file=sys.stderr, flush=True)
