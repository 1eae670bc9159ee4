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
  assignments);
* with SwitchHead (``n_attention_experts``): each head's value experts ``"h{h}.v{e}"`` and output
  experts ``"h{h}.o{e}"`` (``kind`` = ``"value expert"`` / ``"output expert"``; ``load`` = share of
  the head's choices, ``utilisation`` = load x E, ``assignment_count``, ``head_load_cv``) and the
  head -> expert edges (``kind="attention dispatch"``, ``load``). Value experts follow the key/value
  heads: under GQA a kv head's experts are ``"kv{g}.v{e}"``, fed by every query head of its group;
* with MoSA (``n_mosa_heads``): a node per sparse head ``"m0" ..`` (``kind="sparse head"``;
  ``kept_count``, ``kept_share`` = share of the layer's tokens it kept, ``mean_score_kept`` = its
  mean router score on them). A sparse head picks its own tokens, so it has no edges.

Every attribute is a scalar, so the graph (and :func:`layered_routing_graph`, all layers in one
graph with ids prefixed ``"L{layer}."``) writes to GraphML unchanged (:func:`write_graphml`).
:func:`draw_routing_graph` / :func:`draw_routing_graphs` draw it: node size = activation
frequency (heads), utilisation (experts; attention experts: within their head) or kept share
(sparse heads), colour = kind, edge width = mean effective flow or dispatch share. A head's
attention experts sit on a small arc outside it (value experts inner, output experts outer);
sparse heads, sub-tokens and experts in columns to the right.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional, Union

import networkx as nx
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .figures import (
    COLOURS,
    as_report,
    expert_arc_angles,
    fitted_suptitle,
    has_attention_experts,
    has_experts,
    has_sparse_heads,
    kind_prefix,
    new_figure,
    save_figure,
)

HEAD_KINDS = ("shared head", "routed head")  # the nodes on the ring (a sparse head keeps its own column)
ATTENTION_EXPERT_KINDS = {"value": "value expert", "output": "output expert"}
ATTENTION_KIND_NAMES = tuple(ATTENTION_EXPERT_KINDS.values())
HEAD_RADIUS = 1.0
# SwitchHead: each head's experts on an arc of these radii around the head's angle (figures.expert_arc_angles)
ATTENTION_EXPERT_RADII = {"value": 1.45, "output": 1.8}
SUBTOKEN_X, EXPERT_X = 1.9, 3.0
COLUMN_STEP = SUBTOKEN_X - HEAD_RADIUS  # from the ring's edge to the first column, and column to column
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
    for side, section in layer_report.get("attention_experts", {}).items():
        _add_attention_experts(graph, side, section, cfg["n_heads"], layer)
    sparse_heads = layer_report.get("sparse_heads")
    if sparse_heads is not None:
        for index, kept_count in enumerate(sparse_heads["kept_count"]):
            graph.add_node(f"m{index}", kind="sparse head", index=index, layer=layer, kept_count=kept_count,
                           kept_share=sparse_heads["kept_share"][index],
                           mean_score_kept=sparse_heads["mean_score_kept"][index])
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


def attention_expert_node(side: str, owner: int, expert: int, group: int = 1) -> str:
    """The id of SwitchHead's ``expert`` on ``side`` (``"value"`` / ``"output"``) of head ``owner``:
    ``"h{owner}.v{expert}"`` / ``"h{owner}.o{expert}"``; a value expert of kv head ``owner`` shared by a
    GQA group of ``group > 1`` query heads is ``"kv{owner}.v{expert}"``."""
    if side not in ATTENTION_EXPERT_KINDS:
        raise ValueError(f"side={side!r} must be one of {list(ATTENTION_EXPERT_KINDS)}")
    return f"{'kv' if group > 1 else 'h'}{owner}.{side[0]}{expert}"


def _add_attention_experts(graph: nx.DiGraph, side: str, section: Dict[str, Any], n_heads: int, layer: int) -> None:
    """One side of SwitchHead's report: ``load [owners, E]`` (each row sums to 1), ``assignment_count``
    and ``load_cv [owners]``; the owners are the query heads, or the kv heads on the value side under GQA."""
    owners = len(section["load"])
    group = n_heads // owners  # query heads per owner (repeat_interleave order: head h reads kv head h // group)
    for owner, (loads, counts) in enumerate(zip(section["load"], section["assignment_count"])):
        for expert, (load, count) in enumerate(zip(loads, counts)):
            node = attention_expert_node(side, owner, expert, group)
            graph.add_node(node, kind=ATTENTION_EXPERT_KINDS[side], side=side, index=expert, layer=layer,
                           **{"kv_head" if group > 1 else "head": owner}, load=load,
                           utilisation=load * len(loads), assignment_count=count,
                           head_load_cv=section["load_cv"][owner])
            for head in range(owner * group, (owner + 1) * group):
                graph.add_edge(f"h{head}", node, kind="attention dispatch", load=load)


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
        figure = new_figure(_panel_width(report, 4.5, 7.0), 4.5)
        ax = figure.add_subplot()
        _legend(ax, graph)
    else:
        figure = ax.figure
    positions = _layout(graph)
    n_heads = sum(1 for _, node_kind in graph.nodes(data="kind") if node_kind in HEAD_KINDS)
    crowding = min(1.0, 10 / n_heads)  # smaller nodes when many share the circle
    # a head's attention experts share its slice of the circle: smaller still when a slice holds many
    per_slice = max([len(_attention_experts_of(graph, side)) / n_heads for side in ATTENTION_EXPERT_KINDS] + [1])
    arc_crowding = min(1.0, 4 / per_slice)
    sizes = {node: _node_size(data) * crowding * (arc_crowding if data["kind"] in ATTENTION_KIND_NAMES else 1.0)
             for node, data in graph.nodes(data=True)}
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
    panel_width = _panel_width(report, 3.2, 4.6)
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
    if has_attention_experts(report):
        lines.append("attention experts: each head's value (inner arc) and output (outer arc) experts, "
                     "size and line width = share of the head's choices")
    if has_sparse_heads(report):
        lines.append("sparse heads: size = share of the tokens each keeps")
    fitted_suptitle(figure, "\n".join(lines), fontsize=9)
    save_figure(figure, path)
    return figure


def _panel_width(report: Dict[str, Any], heads_only: float, with_experts: float) -> float:
    """Width of one layer's picture: the head ring, plus a column each for sparse heads and experts."""
    width = with_experts if has_experts(report) else heads_only
    if has_attention_experts(report):  # the experts' arcs widen the ring
        width += 0.35 * heads_only
    if has_sparse_heads(report):
        width += 0.3 * heads_only
    return width


def _attention_experts_of(graph: nx.DiGraph, side: str) -> list:
    return [node for node, kind in graph.nodes(data="kind") if kind == ATTENTION_EXPERT_KINDS[side]]


def _layout(graph: nx.DiGraph) -> Dict[str, tuple]:
    """Heads on a circle (networkx circular layout: head ``h`` at angle 2 pi h / H); each head's
    attention experts on an arc outside it; sparse heads, sub-tokens then experts in columns to the right."""
    heads = [node for node, kind in graph.nodes(data="kind") if kind in HEAD_KINDS]
    positions = {node: tuple(xy) for node, xy in
                 nx.circular_layout(heads, scale=HEAD_RADIUS).items()} if len(heads) > 1 else {heads[0]: (0.0, 0.0)}
    ring = HEAD_RADIUS
    for side, radius in ATTENTION_EXPERT_RADII.items():
        experts = _attention_experts_of(graph, side)
        if experts:
            ring = max(ring, radius)
            positions.update(_expert_arcs(graph, experts, radius, len(heads)))
    x = ring + COLUMN_STEP
    for kind in ("sparse head", "subtoken", "expert"):
        column = [node for node, node_kind in graph.nodes(data="kind") if node_kind == kind]
        for i, node in enumerate(column):
            y = 0.0 if len(column) == 1 else 1.2 * HEAD_RADIUS * (1 - 2 * i / (len(column) - 1))
            positions[node] = (x, y)
        if column:
            x += EXPERT_X - SUBTOKEN_X
    return positions


def _expert_arcs(graph: nx.DiGraph, experts: list, radius: float, n_heads: int) -> Dict[str, tuple]:
    """Each owner's experts spread over an arc of ``radius`` centred on its heads' angles (a kv head's:
    the middle of its query group's, between the arcs of the group's output experts), one head's slice wide."""
    owners: Dict[str, list] = {}
    for node in experts:
        owners.setdefault(node.split(".")[0], []).append(node)
    positions = {}
    for group in owners.values():
        heads = sorted(graph.predecessors(group[0]), key=lambda head: graph.nodes[head]["index"])
        first, last = graph.nodes[heads[0]]["index"], graph.nodes[heads[-1]]["index"]
        centre = math.pi * (first + last) / n_heads  # the mean of the group's angles 2 pi h / H
        group = sorted(group, key=lambda node: graph.nodes[node]["index"])
        for node, angle in zip(group, expert_arc_angles(centre, n_heads, len(group))):
            positions[node] = (radius * math.cos(angle), radius * math.sin(angle))
    return positions


def _draw_nodes(ax: Axes, graph: nx.DiGraph, positions: Dict[str, tuple], sizes: Dict[str, float]) -> None:
    nodes = list(graph.nodes)
    colours = [COLOURS[graph.nodes[node]["kind"]] for node in nodes]
    nx.draw_networkx_nodes(graph, positions, nodelist=nodes, node_size=[sizes[n] for n in nodes], node_color=colours,
                           edgecolors="white", linewidths=0.8, ax=ax)
    # attention experts are too small to label; their order along the arc is their index
    labels = {node: _label(node, kind) for node, kind in graph.nodes(data="kind") if kind not in ATTENTION_KIND_NAMES}
    nx.draw_networkx_labels(graph, positions, labels=labels, font_size=7, font_color="white", ax=ax)


def _label(node: str, kind: str) -> str:
    return node if kind in ("subtoken", "sparse head") else node[1:]


def _node_size(data: Dict[str, Any]) -> float:
    if data["kind"] in HEAD_KINDS:
        return 60 + 540 * data["activation_frequency"]
    if data["kind"] == "sparse head":  # the same scale as a head's: the share of tokens it attends for
        return 60 + 540 * data["kept_share"]
    if data["kind"] == "expert":
        return 60 + 270 * min(data["utilisation"], 3.0)  # utilisation 1 = ideal share
    if data["kind"] in ATTENTION_KIND_NAMES:
        return 20 + 100 * min(data["utilisation"], 3.0)  # 1 = the head's choices spread evenly
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
    for kind in ATTENTION_KIND_NAMES:
        # a head's share of choices, drawn on one scale for every head: 1 = all its choices
        chosen = [(s, d) for s, d, edge_kind in graph.edges(data="kind")
                  if edge_kind == "attention dispatch" and graph.nodes[d]["kind"] == kind]
        if chosen:
            nx.draw_networkx_edges(graph, positions, edgelist=chosen,
                                   width=[0.2 + 2.5 * graph.edges[e]["load"] for e in chosen], alpha=0.5,
                                   edge_color=COLOURS[kind], arrows=False, nodelist=nodes, node_size=node_sizes,
                                   ax=ax)


def _legend_handles(graph: nx.DiGraph) -> list:
    kinds = sorted({kind for _, kind in graph.nodes(data="kind")}, key=list(COLOURS).index)
    return [Line2D([], [], marker="o", linestyle="", markersize=7, color=COLOURS[kind], label=kind)
            for kind in kinds]


def _legend(ax: Axes, graph: nx.DiGraph) -> None:
    ax.legend(handles=_legend_handles(graph), loc="upper left", fontsize=7, frameon=False,
              bbox_to_anchor=(0.0, 1.0))
