"""Routing graphs: the head graph of each layer (and its experts) with the statistics on it.

:func:`routing_graph` builds the ``networkx.DiGraph`` of one layer from a statistics report:

* head nodes ``"h0" .. "h{H-1}"`` (``kind`` = ``"shared head"`` / ``"routed head"``) with
  ``activation_frequency``, ``activation_count``, ``mean_gate``, ``gate_mass``;
* the head graph's edges ``"h{src}" -> "h{dst}"`` (graph router only; ``kind="flow"``) with
  ``coactivation`` and, with inter-head flow, ``mean_flow``, ``mean_effective_flow``,
  ``mean_flow_when_active``;
* with experts: sub-token nodes ``"s0" ..`` and routed-expert nodes ``"e0" ..`` (``kind`` =
  ``"subtoken"`` / ``"expert"``; ``load``, ``utilisation``, ``assignment_count``, ``gate_mass``)
  and the sub-token -> expert edges (``kind="dispatch"``, ``load`` = share of that sub-token's
  assignments).

Every attribute is a scalar, so the graph (and :func:`layered_routing_graph`, all layers in one
graph with ids prefixed ``"L{layer}."``) writes to GraphML unchanged (:func:`write_graphml`).
:func:`draw_routing_graph` / :func:`draw_routing_graphs` draw it: node size = activation
frequency (heads) or utilisation (experts), colour = kind, edge width = mean effective flow or
dispatch share.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional, Union

import networkx as nx
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .figures import COLOURS, as_report, fitted_suptitle, has_experts, kind_prefix, new_figure, save_figure

HEAD_RADIUS = 1.0
SUBTOKEN_X, EXPERT_X = 1.9, 3.0
MAX_DRAWN_FLOW_EDGES = 160  # beyond this the picture is a grey disc; the GraphML keeps every edge


def routing_graph(stats: Any, layer: int) -> nx.DiGraph:
    """The ``networkx.DiGraph`` of ``layer`` with the statistics as node/edge attributes."""
    report = as_report(stats)
    n_layers = len(report["layers"])
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer={layer} must be in 0..{n_layers - 1}")
    layer_report = report["layers"][layer]
    cfg, heads = report["config"], layer_report["heads"]
    graph = nx.DiGraph(layer=layer, tokens=layer_report["tokens"], router=cfg["router"])
    for head in range(cfg["n_heads"]):
        graph.add_node(f"h{head}", kind="shared head" if head < cfg["n_shared_heads"] else "routed head",
                       index=head, layer=layer,
                       activation_frequency=heads["activation_frequency"][head],
                       activation_count=heads["activation_count"][head],
                       mean_gate=heads["mean_gate"][head], gate_mass=heads["gate_mass"][head])
    flow = layer_report.get("flow", {})
    for edge, (src, dst) in enumerate(report["head_edges"]):
        attributes = {name: values[edge] for name, values in flow.items()}
        graph.add_edge(f"h{src}", f"h{dst}", kind="flow", coactivation=heads["coactivation"][src][dst],
                       **attributes)
    experts = layer_report.get("experts")
    if experts is not None:
        _add_experts(graph, experts, report["expert_edges"], layer, layer_report["tokens"], cfg)
    return graph


def _add_experts(graph: nx.DiGraph, experts: Dict[str, Any], expert_edges: list, layer: int,
                 tokens: int, cfg: Dict[str, Any]) -> None:
    for slot in range(cfg["n_subtokens"]):
        graph.add_node(f"s{slot}", kind="subtoken", index=slot, layer=layer,
                       assignments=tokens * cfg["top_k_experts"])
    per_expert = ["assignment_count", "load", "utilisation", "gate_mass", "weight_share", "expert_drop_rate"]
    for expert in range(len(experts["load"])):
        graph.add_node(f"e{expert}", kind="expert", index=expert, layer=layer,
                       **{name: experts[name][expert] for name in per_expert if name in experts})
    for slot, expert in expert_edges:
        graph.add_edge(f"s{slot}", f"e{expert}", kind="dispatch", load=experts["subtoken_load"][slot][expert])


def layered_routing_graph(stats: Any) -> nx.DiGraph:
    """Every layer's :func:`routing_graph` in one graph; node ids prefixed ``"L{layer}."``."""
    report = as_report(stats)
    graph = nx.DiGraph(tokens=report["tokens"], router=report["config"]["router"],
                       n_layers=len(report["layers"]))
    for layer in range(len(report["layers"])):
        layer_graph = routing_graph(report, layer)
        graph.add_nodes_from((f"L{layer}.{node}", data) for node, data in layer_graph.nodes(data=True))
        graph.add_edges_from((f"L{layer}.{src}", f"L{layer}.{dst}", data)
                             for src, dst, data in layer_graph.edges(data=True))
    return graph


def write_graphml(stats: Any, path: Union[str, Path]) -> Path:
    """Write :func:`layered_routing_graph` as GraphML (read back with ``networkx.read_graphml``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nx.write_graphml(layered_routing_graph(stats), path)
    return path


# ---------------------------------------------------------------------- drawing
def draw_routing_graph(stats: Any, layer: int, ax: Optional[Axes] = None,
                       path: Optional[Union[str, Path]] = None, kind: Optional[str] = None) -> Figure:
    """Draw one layer's routing graph on ``ax`` (a new figure when ``None``); returns the figure.

    ``kind``: the attention kind the statistics are of (``"encoder"``, ``"decoder_self"``,
    ``"cross"``; :mod:`gohgraph.viz.kinds`), named in the title; ``None`` for a decoder-only model."""
    report = as_report(stats)
    graph = routing_graph(report, layer)
    if ax is None:
        figure = new_figure(7.0 if has_experts(report) else 4.5, 4.5)
        ax = figure.add_subplot()
        _legend(ax, graph)
    else:
        figure = ax.figure
    positions = _layout(graph)
    n_heads = sum(1 for _, node_kind in graph.nodes(data="kind") if node_kind.endswith("head"))
    crowding = min(1.0, 10 / n_heads)  # smaller nodes when many share the circle
    sizes = {node: _node_size(data) * crowding for node, data in graph.nodes(data=True)}
    _draw_edges(ax, graph, positions, sizes)
    _draw_nodes(ax, graph, positions, sizes)
    ax.set_title(f"{kind_prefix(kind)}layer {layer}", fontsize=10)
    ax.set_aspect("equal")
    ax.margins(0.12)
    ax.axis("off")
    save_figure(figure, path)
    return figure


def draw_routing_graphs(stats: Any, path: Optional[Union[str, Path]] = None, columns: int = 4,
                        kind: Optional[str] = None) -> Figure:
    """Every layer's routing graph in one grid figure, with a shared legend; ``kind`` as in
    :func:`draw_routing_graph` (named in every panel's title and the figure's)."""
    report = as_report(stats)
    n_layers = len(report["layers"])
    columns = max(1, min(columns, n_layers))
    rows = math.ceil(n_layers / columns)
    panel_width = 4.6 if has_experts(report) else 3.2
    figure = new_figure(max(panel_width * columns, 6.5), 3.2 * rows + 0.8)
    axes = figure.subplots(rows, columns, squeeze=False)
    for layer, ax in enumerate(axes.flat):
        if layer < n_layers:
            draw_routing_graph(report, layer, ax=ax, kind=kind)
        else:
            ax.axis("off")
    handles = _legend_handles(routing_graph(report, 0))
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    lines = [f"{kind_prefix(kind)}routing graphs: {report['config']['router']} router, {report['tokens']} tokens",
             "heads: size = activation frequency, arrow width = mean effective flow",
             "(relative to the widest arrow, whose value is printed under each layer)"]
    if has_experts(report):
        lines.append("experts: size = utilisation, arrow width = share of the sub-token's assignments")
    fitted_suptitle(figure, "\n".join(lines), fontsize=9)
    save_figure(figure, path)
    return figure


def _layout(graph: nx.DiGraph) -> Dict[str, tuple]:
    """Heads on a circle (networkx circular layout); sub-tokens then experts in columns to the right."""
    heads = [node for node, kind in graph.nodes(data="kind") if kind.endswith("head")]
    positions = {node: tuple(xy) for node, xy in
                 nx.circular_layout(heads, scale=HEAD_RADIUS).items()} if len(heads) > 1 else {heads[0]: (0.0, 0.0)}
    for kind, x in (("subtoken", SUBTOKEN_X), ("expert", EXPERT_X)):
        column = [node for node, node_kind in graph.nodes(data="kind") if node_kind == kind]
        for i, node in enumerate(column):
            y = 0.0 if len(column) == 1 else 1.2 * HEAD_RADIUS * (1 - 2 * i / (len(column) - 1))
            positions[node] = (x, y)
    return positions


def _draw_nodes(ax: Axes, graph: nx.DiGraph, positions: Dict[str, tuple], sizes: Dict[str, float]) -> None:
    nodes = list(graph.nodes)
    colours = [COLOURS[graph.nodes[node]["kind"]] for node in nodes]
    nx.draw_networkx_nodes(graph, positions, nodelist=nodes, node_size=[sizes[n] for n in nodes], node_color=colours,
                           edgecolors="white", linewidths=0.8, ax=ax)
    labels = {node: node[1:] if graph.nodes[node]["kind"] != "subtoken" else f"s{node[1:]}" for node in nodes}
    nx.draw_networkx_labels(graph, positions, labels=labels, font_size=7, font_color="white", ax=ax)


def _node_size(data: Dict[str, Any]) -> float:
    if data["kind"].endswith("head"):
        return 60 + 540 * data["activation_frequency"]
    if data["kind"] == "expert":
        return 60 + 270 * min(data["utilisation"], 3.0)  # utilisation 1 = ideal share
    return 220


def _draw_edges(ax: Axes, graph: nx.DiGraph, positions: Dict[str, tuple], sizes: Dict[str, float]) -> None:
    # node sizes let the arrow heads stop at each node's rim instead of hiding under it
    nodes, node_sizes = list(sizes), list(sizes.values())
    flow_edges = [(s, d) for s, d, kind in graph.edges(data="kind") if kind == "flow"]
    if flow_edges:
        values = [graph.edges[e].get("mean_effective_flow") for e in flow_edges]
        if values[0] is None:  # no inter-head flow: draw the message-passing graph thinly
            widths, alpha = [0.5] * len(flow_edges), 0.25
        else:
            if len(flow_edges) > MAX_DRAWN_FLOW_EDGES:  # e.g. 32 heads, complete: 992 edges
                total = len(flow_edges)
                kept = sorted(range(total), key=values.__getitem__)[-MAX_DRAWN_FLOW_EDGES:]
                flow_edges, values = [flow_edges[i] for i in kept], [values[i] for i in kept]
                ax.text(0.5, -0.02, f"{MAX_DRAWN_FLOW_EDGES} strongest of {total} edges drawn",
                        transform=ax.transAxes, ha="center", fontsize=6)
            top = max(max(values), 1e-12)
            widths, alpha = [0.2 + 4.0 * v / top for v in values], 0.6
            # the scale: widths are relative to this layer's strongest edge, so say what that is
            ax.text(0.5, -0.08, f"widest arrow: mean effective flow {top:.3f}", transform=ax.transAxes,
                    ha="center", fontsize=6, color=COLOURS["flow"])
        nx.draw_networkx_edges(graph, positions, edgelist=flow_edges, width=widths, alpha=alpha,
                               edge_color=COLOURS["flow"], arrows=True, arrowsize=6,
                               connectionstyle="arc3,rad=0.15", nodelist=nodes, node_size=node_sizes, ax=ax)
    dispatch = [(s, d) for s, d, kind in graph.edges(data="kind") if kind == "dispatch"]
    if dispatch:
        loads = [graph.edges[e]["load"] for e in dispatch]
        top = max(max(loads), 1e-12)
        nx.draw_networkx_edges(graph, positions, edgelist=dispatch, width=[0.2 + 3.5 * v / top for v in loads],
                               alpha=0.55, edge_color=COLOURS["expert"], arrows=True, arrowsize=6,
                               nodelist=nodes, node_size=node_sizes, ax=ax)


def _legend_handles(graph: nx.DiGraph) -> list:
    kinds = sorted({kind for _, kind in graph.nodes(data="kind")}, key=list(COLOURS).index)
    return [Line2D([], [], marker="o", linestyle="", markersize=7, color=COLOURS[kind], label=kind)
            for kind in kinds]


def _legend(ax: Axes, graph: nx.DiGraph) -> None:
    ax.legend(handles=_legend_handles(graph), loc="upper left", fontsize=7, frameon=False,
              bbox_to_anchor=(0.0, 1.0))
