"""Pictures of routing: routing graphs, load heatmaps, token traces and training curves.

Every drawing function takes a :class:`~gohgraph.analysis.stats.collect.RoutingStats` (or its ``report()`` dict,
e.g. read back from ``stats.json``), returns a ``matplotlib.figure.Figure`` drawn on an Agg
canvas, and saves it when given ``path=`` (PNG, SVG or PDF by suffix).
:func:`write_all_pictures` writes the whole set for a model at once:

    stats = collect_routing_stats(model, batches)
    viz.write_all_pictures(model, stats, "runs/x/pictures", text="def main():", metrics_csv="runs/x/metrics.csv")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Union

from ..analysis.stats.kinds import SEQ2SEQ_KINDS
from .coactivation import coactivation_heatmaps
from .cross_layer import cross_layer_heatmaps, load_percentiles_figure
from .curves import read_metrics_csv, training_curves
from .figures import KIND_TITLES, as_report, has_experts, save_figure
from .heatmap import ablation_heatmap, expert_load_heatmap, head_load_heatmap
from .html_report import html_report, write_html_report
from .kinds import (
    expert_heatmaps_by_kind,
    head_heatmaps_by_kind,
    kind_file,
    kind_reports,
    routing_graphs_by_kind,
    routing_graphs_of_layer,
)
from .routing_graph import draw_routing_graph, draw_routing_graphs, layered_routing_graph, routing_graph, write_graphml
from .saturation import saturation_figure
from .specialisation import specialisation_heatmap
from .token_trace import byte_decode, byte_encode, token_labels, token_routing, token_trace

# file names write_all_pictures uses in its output directory
ROUTING_GRAPHS, HEAD_HEATMAP, EXPERT_HEATMAP = "routing_graphs.png", "head_load_heatmap.png", "expert_load_heatmap.png"
TOKEN_TRACE, TRAINING_CURVES, GRAPHML = "token_trace.png", "training_curves.png", "routing_graph.graphml"
SPECIALISATION, CROSS_LAYER, LOAD_PERCENTILES = "specialisation.png", "cross_layer.png", "load_percentiles.png"
HEAD_COACTIVATION, EXPERT_COACTIVATION = "head_coactivation.png", "expert_coactivation.png"
_PER_REPORT = (ROUTING_GRAPHS, HEAD_HEATMAP, EXPERT_HEATMAP, GRAPHML, SPECIALISATION, CROSS_LAYER, LOAD_PERCENTILES,
               HEAD_COACTIVATION, EXPERT_COACTIVATION)
# every name write_all_pictures may write, the per-kind names of a seq2seq model's pictures included
PICTURE_FILES = (ROUTING_GRAPHS, HEAD_HEATMAP, EXPERT_HEATMAP, TOKEN_TRACE, TRAINING_CURVES, GRAPHML, SPECIALISATION,
                 CROSS_LAYER, LOAD_PERCENTILES, HEAD_COACTIVATION, EXPERT_COACTIVATION,
                 *(kind_file(name, kind) for kind in SEQ2SEQ_KINDS for name in _PER_REPORT))

__all__ = [
    "as_report", "byte_decode", "byte_encode", "coactivation_heatmaps", "cross_layer_heatmaps", "draw_routing_graph",
    "draw_routing_graphs",
    "load_percentiles_figure", "saturation_figure", "specialisation_heatmap", "html_report", "write_html_report",
    "ablation_heatmap", "expert_load_heatmap", "head_load_heatmap", "layered_routing_graph", "read_metrics_csv",
    "routing_graph", "save_figure", "token_labels", "token_routing", "token_trace", "training_curves",
    "write_all_pictures", "write_graphml", "kind_reports", "kind_file", "routing_graphs_by_kind",
    "head_heatmaps_by_kind", "expert_heatmaps_by_kind", "routing_graphs_of_layer", "KIND_TITLES", "SEQ2SEQ_KINDS",
]


def write_all_pictures(model: Any, stats: Any, out_dir: Union[str, Path], text: Optional[str] = None,
                       metrics_csv: Optional[Union[str, Path]] = None,
                       encode: Optional[Callable[[str], Sequence[int]]] = None,
                       decode: Optional[Callable[[Sequence[int]], str]] = None,
                       trace_tokens: int = 64) -> List[Path]:
    """Write every picture of ``model`` / ``stats`` into ``out_dir``; returns the written paths.

    Always: ``routing_graphs.png`` (all layers), ``head_load_heatmap.png`` and
    ``routing_graph.graphml``. With experts: ``expert_load_heatmap.png``. With ``text``:
    ``token_trace.png`` (``encode`` / ``decode`` default to byte-level UTF-8). With an existing
    ``metrics_csv``: ``training_curves.png``. With more than one layer: ``cross_layer.png``; with routed
    heads or experts: ``load_percentiles.png``; with statistics collected by source:
    ``specialisation.png``; ``head_coactivation.png`` (and with experts ``expert_coactivation.png``):
    P(b | a) within each layer. ``trace_tokens``: the most tokens the trace draws (a longer text is refused).

    Statistics of a seq2seq model (one report per attention kind, :mod:`gohgraph.viz.kinds`) write
    every per-report picture once per kind, named ``<picture>_<kind>`` (``routing_graphs_encoder.png``,
    ``head_load_heatmap_cross.png``, ...) and titled with the kind; their token trace is not drawn
    (it follows one stack's routing of one text). An encoder's pictures keep the plain names and
    are titled "encoder self-attention".
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = kind_reports(stats)
    per_kind = len(reports) > 1
    written: List[Path] = []
    for kind, report in reports.items():
        def name(file: str) -> Path:
            return out_dir / (kind_file(file, kind) if per_kind else file)

        written.append(_saved(draw_routing_graphs(report, kind=kind), name(ROUTING_GRAPHS)))
        written.append(_saved(head_load_heatmap(report, kind=kind), name(HEAD_HEATMAP)))
        if has_experts(report):
            written.append(_saved(expert_load_heatmap(report, kind=kind), name(EXPERT_HEATMAP)))
        if report.get("cross_layer"):
            written.append(_saved(cross_layer_heatmaps(report), name(CROSS_LAYER)))
        if report["summary"].get("load_percentiles"):
            written.append(_saved(load_percentiles_figure(report), name(LOAD_PERCENTILES)))
        if "by_source" in report:
            written.append(_saved(specialisation_heatmap(report), name(SPECIALISATION)))
        for unit_kind, file in (("heads", HEAD_COACTIVATION), ("experts", EXPERT_COACTIVATION)):
            if any("coactivation_given" in layer.get(unit_kind, {}) for layer in report["layers"]):
                written.append(_saved(coactivation_heatmaps(report, unit_kind, attention_kind=kind), name(file)))
    if text and not per_kind:
        written.append(_saved(token_trace(model, text, encode=encode, decode=decode, max_tokens=trace_tokens),
                              out_dir / TOKEN_TRACE))
    if metrics_csv is not None and Path(metrics_csv).is_file():
        written.append(_saved(training_curves(metrics_csv), out_dir / TRAINING_CURVES))
    for kind, report in reports.items():
        written.append(write_graphml(report, out_dir / (kind_file(GRAPHML, kind) if per_kind else GRAPHML)))
    return written


def _saved(figure, path: Path) -> Path:
    return save_figure(figure, path)
