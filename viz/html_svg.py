"""Inline SVG for the HTML report: a routing graph per layer and heatmap grids, hover text as data.

Every element that explains itself on hover carries its text in ``data-tip`` (the report's script
shows it in a tooltip); nothing refers to a file or a URL, so the page works opened from disk.
All numbers come from a statistics report (:meth:`RoutingStats.report`); nothing is recomputed.
"""

from __future__ import annotations

import html
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .figures import COLOURS, expert_arc_angles

GRAPH_SIZE = (420, 300)
HEAD_CIRCLE = (140, 150, 95)  # centre x, centre y, radius
EXPERT_X = 350
MAX_FLOW_WIDTH = 8.0
# SwitchHead: a smaller head circle, each head's value and output experts on arcs this far outside
# it (figures.expert_arc_angles)
ATTENTION_HEAD_RADIUS, ATTENTION_EXPERT_OFFSETS = 68, {"value": 28, "output": 54}
SPARSE_HEAD_X = 300  # MoSA's sparse heads: a column between the head circle and the experts
SPARSE_COLUMN_WIDTH = 70  # what the sparse column adds to the picture's width when experts follow it


def attr(value: Any) -> str:
    return html.escape(str(value), quote=True)


def routing_graph_svg(layer_report: Dict[str, Any], head_edges: Sequence[Sequence[int]], n_shared_heads: int,
                      token_label: Callable[[int], str], notes: Optional[Mapping[Tuple[str, int, int], str]] = None
                      ) -> str:
    """One layer: heads on a circle (size = activation frequency), inter-head flow edges (width =
    mean effective flow, scaled to the layer's largest), routed experts in a column (size = utilisation).
    SwitchHead: each head's value (inner) and output (outer) experts on an arc outside it, sized and
    linked by their share of the head's choices; MoSA: the sparse heads in a column (size = share of
    tokens kept). ``notes[("head" | "expert", layer, unit)]``: a line added to that unit's hover text
    (its Δ loss and the tokens it promotes, :mod:`gohgraph.viz.html_units`)."""
    notes = notes or {}
    at = layer_report["layer"]
    width, height = GRAPH_SIZE
    cx, cy, radius = HEAD_CIRCLE
    attention_experts = layer_report.get("attention_experts")
    sparse_heads = layer_report.get("sparse_heads")
    experts = layer_report.get("experts")
    if attention_experts:
        radius = ATTENTION_HEAD_RADIUS
    expert_x = EXPERT_X + (SPARSE_COLUMN_WIDTH if sparse_heads is not None else 0)
    if sparse_heads is not None and experts is not None:
        width += SPARSE_COLUMN_WIDTH
    heads = layer_report["heads"]
    n_heads = len(heads["activation_frequency"])
    positions = [(cx + radius * math.cos(_head_angle(i, n_heads)), cy + radius * math.sin(_head_angle(i, n_heads)))
                 for i in range(n_heads)]
    parts = [f'<svg class="routing-graph" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             f'role="img" aria-label="routing graph of layer {layer_report["layer"]}">']
    flow = layer_report.get("flow", {}).get("mean_effective_flow")
    if flow is not None and head_edges:
        top = max(max(flow), 1e-12)
        for (src, dst), value, raw in zip(head_edges, flow, layer_report["flow"]["mean_flow"]):
            (x1, y1), (x2, y2) = positions[src], positions[dst]
            bend = 0.18  # both directions of an edge stay visible
            mx, my = (x1 + x2) / 2 - bend * (y2 - y1), (y1 + y2) / 2 + bend * (x2 - x1)
            tip = (f"edge h{src} \u2192 h{dst}: mean flow {raw:.4f}, mean effective flow {value:.4f} "
                   f"(only where h{dst} is active)")
            parts.append(f'<path class="edge" d="M{x1:.1f},{y1:.1f} Q{mx:.1f},{my:.1f} {x2:.1f},{y2:.1f}" '
                         f'stroke="{COLOURS["flow"]}" stroke-opacity="0.55" fill="none" '
                         f'stroke-width="{0.6 + MAX_FLOW_WIDTH * value / top:.2f}" data-tip="{attr(tip)}"/>')
        parts.append(f'<text x="6" y="{height - 8}" class="note">arrow width: mean effective flow, widest = '
                     f'{top:.3f}</text>')
    if attention_experts:
        parts += _attention_experts_svg(attention_experts, n_heads, (cx, cy, radius), positions)
    if sparse_heads is not None:
        parts += _sparse_heads_svg(sparse_heads, height)
    if experts is not None:
        n_experts = len(experts["load"])
        for e in range(n_experts):
            y = 30 + (height - 60) * (e / max(1, n_experts - 1) if n_experts > 1 else 0.5)
            size = 5 + 7 * math.sqrt(min(experts["utilisation"][e], 4.0))
            tops = _top_tokens(experts.get("top_tokens"), e, token_label)
            tip = (f"expert e{e}: load {experts['load'][e]:.3f} of assignments, utilisation "
                   f"{experts['utilisation'][e]:.2f}x ideal, {experts['assignment_count'][e]} assignments"
                   + (f"; top tokens {tops}" if tops else "") + _note(notes, ("expert", at, e)))
            parts.append(f'<circle class="node expert" cx="{expert_x}" cy="{y:.1f}" r="{size:.1f}" '
                         f'fill="{COLOURS["expert"]}" data-tip="{attr(tip)}"/>'
                         f'<text x="{expert_x + 16}" y="{y + 4:.1f}" class="label">e{e}</text>')
        parts.append(f'<text x="{expert_x - 30}" y="14" class="note">routed experts</text>')
    for h, (x, y) in enumerate(positions):
        kind = "shared head" if h < n_shared_heads else "routed head"
        size = 6 + 16 * math.sqrt(heads["activation_frequency"][h])
        tops = _top_tokens(heads.get("top_tokens"), h, token_label)
        tip = (f"{kind} h{h}: active for {heads['activation_frequency'][h]:.1%} of tokens, mean gate "
               f"{heads['mean_gate'][h]:.3f}" + (f"; top tokens {tops}" if tops else "") + _note(notes, ("head", at, h)))
        parts.append(f'<circle class="node head" cx="{x:.1f}" cy="{y:.1f}" r="{size:.1f}" fill="{COLOURS[kind]}" '
                     f'data-tip="{attr(tip)}"/><text x="{x:.1f}" y="{y + 4:.1f}" class="label inside">{h}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _head_angle(head: float, n_heads: int) -> float:
    """Head ``head``'s angle on the circle, the first at the top, clockwise (a fraction: between heads)."""
    return 2 * math.pi * head / n_heads - math.pi / 2


def _attention_experts_svg(attention_experts: Dict[str, Any], n_heads: int, circle: Tuple[float, float, float],
                           positions: Sequence[Tuple[float, float]]) -> List[str]:
    """SwitchHead's experts of one layer: per side, ``load [owners, E]`` (each row sums to 1); the owners
    are the query heads, or on the value side under GQA the kv heads, each fed by its group of query heads."""
    cx, cy, radius = circle
    lines, circles = [], []
    for side, section in attention_experts.items():
        owners = len(section["load"])
        group = n_heads // owners
        ring = radius + ATTENTION_EXPERT_OFFSETS[side]
        colour = COLOURS[f"{side} expert"]
        for owner, (loads, counts) in enumerate(zip(section["load"], section["assignment_count"])):
            fed_by = range(owner * group, (owner + 1) * group)
            centre = _head_angle(owner * group + (group - 1) / 2, n_heads)
            angles = expert_arc_angles(centre, n_heads, len(loads))
            name = f"head h{owner}" if group == 1 else f"kv head {owner} (query heads h{fed_by[0]}-h{fed_by[-1]})"
            for e, (load, count, angle) in enumerate(zip(loads, counts, angles)):
                x, y = cx + ring * math.cos(angle), cy + ring * math.sin(angle)
                for head in fed_by:
                    hx, hy = positions[head]
                    lines.append(f'<line class="edge" x1="{hx:.1f}" y1="{hy:.1f}" x2="{x:.1f}" y2="{y:.1f}" '
                                 f'stroke="{colour}" stroke-opacity="0.5" stroke-width="{0.4 + 3 * load:.2f}"/>')
                size = 2 + 3 * math.sqrt(min(load * len(loads), 4.0))
                tip = (f"{side} expert {e} of {name}: {load:.1%} of its choices ({count}), its load CV "
                       f"{section['load_cv'][owner]:.2f}")
                circles.append(f'<circle class="node {side}-expert" cx="{x:.1f}" cy="{y:.1f}" r="{size:.1f}" '
                               f'fill="{colour}" data-tip="{attr(tip)}"/>')
    return lines + circles


def _sparse_heads_svg(sparse_heads: Dict[str, Any], height: int) -> List[str]:
    """MoSA's sparse heads of one layer in a column: size = share of the layer's tokens each keeps."""
    parts = [f'<text x="{SPARSE_HEAD_X - 30}" y="14" class="note">sparse heads</text>']
    n_sparse = len(sparse_heads["kept_share"])
    for i, share in enumerate(sparse_heads["kept_share"]):
        y = 30 + (height - 60) * (i / max(1, n_sparse - 1) if n_sparse > 1 else 0.5)
        size = 6 + 16 * math.sqrt(share)  # the heads' scale: the share of tokens attended for
        tip = (f"sparse head m{i}: keeps {share:.1%} of tokens ({sparse_heads['kept_count'][i]}), mean router "
               f"score {sparse_heads['mean_score_kept'][i]:.3f} on them")
        parts.append(f'<circle class="node sparse-head" cx="{SPARSE_HEAD_X}" cy="{y:.1f}" r="{size:.1f}" '
                     f'fill="{COLOURS["sparse head"]}" data-tip="{attr(tip)}"/>'
                     f'<text x="{SPARSE_HEAD_X}" y="{y + 4:.1f}" class="label inside">m{i}</text>')
    return parts


def heatmap_svg(values: List[List[Optional[float]]], row_labels: Sequence[str], column_labels: Sequence[str],
                colour: Callable[[Optional[float]], str], tip: Callable[[int, int, Optional[float]], str],
                title: str, cell: int = 30, fmt: str = "{:.2f}") -> str:
    """A grid of ``[rows, columns]`` cells coloured by ``colour(value)``, each with its hover text and
    its value written as ``fmt``."""
    left, top = 90, 34
    width, height = left + cell * len(column_labels) + 10, top + cell * len(row_labels) + 10
    parts = [f'<svg class="heatmap" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{attr(title)}"><text x="4" y="14" class="title">{html.escape(title)}</text>']
    for j, label in enumerate(column_labels):
        parts.append(f'<text x="{left + cell * j + cell / 2}" y="{top - 4}" class="label" '
                     f'text-anchor="middle">{html.escape(label)}</text>')
    for i, label in enumerate(row_labels):
        parts.append(f'<text x="{left - 6}" y="{top + cell * i + cell / 2 + 4}" class="label" '
                     f'text-anchor="end">{html.escape(label)}</text>')
        for j, value in enumerate(values[i]):
            text = "" if value is None else fmt.format(value)
            parts.append(f'<rect class="cell" x="{left + cell * j}" y="{top + cell * i}" width="{cell - 1}" '
                         f'height="{cell - 1}" fill="{colour(value)}" data-tip="{attr(tip(i, j, value))}"/>'
                         f'<text x="{left + cell * j + cell / 2}" y="{top + cell * i + cell / 2 + 3}" '
                         f'class="cell-text" text-anchor="middle">{text}</text>')
    parts.append("</svg>")
    return "".join(parts)


def sequential_colour(vmax: float) -> Callable[[Optional[float]], str]:
    """White -> dark blue over ``[0, vmax]``; grey for undefined."""
    def colour(value: Optional[float]) -> str:
        if value is None:
            return "#dddddd"
        t = max(0.0, min(1.0, value / vmax if vmax > 0 else 0.0))
        return _mix((255, 255, 255), (33, 76, 150), t)
    return colour


def diverging_colour(centre: float = 1.0, span: float = 2.0) -> Callable[[Optional[float]], str]:
    """Blue below ``centre``, white at it, red above, on a log scale (ratios); grey for undefined."""
    def colour(value: Optional[float]) -> str:
        if value is None:
            return "#dddddd"
        t = math.log(max(value, 1e-3) / centre) / math.log(span)
        t = max(-1.0, min(1.0, t))
        return _mix((255, 255, 255), (178, 24, 43), t) if t >= 0 else _mix((255, 255, 255), (33, 102, 172), -t)
    return colour


def signed_colour(limit: float) -> Callable[[Optional[float]], str]:
    """Blue below 0, white at 0, red above, full at ``±limit`` (a difference such as Δ loss); grey for undefined."""
    def colour(value: Optional[float]) -> str:
        if value is None:
            return "#dddddd"
        t = max(-1.0, min(1.0, value / limit if limit > 0 else 0.0))
        return _mix((255, 255, 255), (178, 24, 43), t) if t >= 0 else _mix((255, 255, 255), (33, 102, 172), -t)
    return colour


def _mix(a, b, t: float) -> str:
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(a, b))


def _note(notes: Mapping[Tuple[str, int, int], str], key: Tuple[str, int, int]) -> str:
    return f"\n{notes[key]}" if key in notes else ""


def _top_tokens(top_tokens: Optional[list], node: int, token_label: Callable[[int], str]) -> str:
    if not top_tokens or node >= len(top_tokens):
        return ""
    return ", ".join(f"{token_label(token)!s} {share:.0%}" for token, share in top_tokens[node])
