"""One set of routing pictures per attention kind: encoder self, decoder self and cross attention.

A seq2seq model's statistics (:class:`~gohgraph.analysis.stats.kinds.KindRoutingStats`) hold one
ordinary report per attention kind under ``report["kinds"]``; each kind is its own routing graph,
so each is drawn on its own, titled with the kind. :func:`kind_reports` gives the reports to draw
for any model: the three kinds of a seq2seq model, ``{"encoder": report}`` for an encoder and
``{"decoder": report}`` for a decoder-only model (whose pictures stay untitled by kind).
"""

from __future__ import annotations

from typing import Any, Dict

from matplotlib.figure import Figure

from .figures import as_report, has_experts
from .heatmap import expert_load_heatmap, head_load_heatmap
from .routing_graph import draw_routing_graphs, routing_graph


def kind_reports(stats: Any) -> Dict[str, Dict[str, Any]]:
    """``{kind: report}`` of ``stats`` (statistics object or report dict), in the model's kind order."""
    report = stats.report() if not isinstance(stats, dict) and hasattr(stats, "report") else stats
    if isinstance(report, dict) and "kinds" in report:
        kinds = report["kinds"]
        if not isinstance(kinds, dict) or not kinds:
            raise ValueError("report['kinds'] must map each attention kind to its report")
        return {kind: as_report(kind_report) for kind, kind_report in kinds.items()}
    report = as_report(report)
    return {report["config"].get("model_type", "decoder"): report}


def kind_file(name: str, kind: str) -> str:
    """``"routing_graphs.png"`` -> ``"routing_graphs_cross.png"``: the file of one kind's picture."""
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}_{kind}{dot}{suffix}" if dot else f"{name}_{kind}"


def routing_graphs_by_kind(stats: Any, columns: int = 4) -> Dict[str, Figure]:
    """``{kind: figure}``: every layer's routing graph of each attention kind, titled with the kind."""
    return {kind: draw_routing_graphs(report, columns=columns, kind=kind) for kind, report in kind_reports(stats).items()}


def head_heatmaps_by_kind(stats: Any, metric: str = "activation_frequency") -> Dict[str, Figure]:
    """``{kind: figure}``: the ``[layers, heads]`` heatmap of ``metric`` of each attention kind."""
    return {kind: head_load_heatmap(report, metric=metric, kind=kind) for kind, report in kind_reports(stats).items()}


def expert_heatmaps_by_kind(stats: Any) -> Dict[str, Figure]:
    """``{kind: figure}``: the expert utilisation heatmap of each kind that has experts (not ``cross``)."""
    return {kind: expert_load_heatmap(report, kind=kind) for kind, report in kind_reports(stats).items()
            if has_experts(report)}


def routing_graphs_of_layer(stats: Any, layer: int) -> Dict[str, Any]:
    """``{kind: networkx.DiGraph}`` of ``layer`` in every kind that has it."""
    return {kind: routing_graph(report, layer) for kind, report in kind_reports(stats).items()
            if layer < len(report["layers"])}
