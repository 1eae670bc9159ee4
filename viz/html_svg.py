"""Inline SVG for the HTML report: a routing graph per layer and heatmap grids, hover text as data.

Every element that explains itself on hover carries its text in ``data-tip`` (the report's script
shows it in a tooltip); nothing refers to a file or a URL, so the page works opened from disk.
All numbers come from a statistics report (:meth:`RoutingStats.report`); nothing is recomputed.
"""

from __future__ import annotations

import html
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .figures import COLOURS

GRAPH_SIZE = (420, 300)
HEAD_CIRCLE = (140, 150, 95)  # centre x, centre y, radius
EXPERT_X = 350
MAX_FLOW_WIDTH = 8.0


def attr(value: Any) -> str:
    return html.escape(str(value), quote=True)


def routing_graph_svg(layer_report: Dict[str, Any], head_edges: Sequence[Sequence[int]], n_shared_heads: int,
                      token_label: Callable[[int], str], notes: Optional[Mapping[Tuple[str, int, int], str]] = None
                      ) -> str:
    """One layer: heads on a circle (size = activation frequency), inter-head flow edges (width =
    mean effective flow, scaled to the layer's largest), routed experts in a column (size = utilisation).
    ``notes[("head" | "expert", layer, unit)]``: a line added to that unit's hover text (its Δ loss
    and the tokens it promotes, :mod:`gohgraph.viz.html_units`)."""
    notes = notes or {}
    at = layer_report["layer"]
    width, height = GRAPH_SIZE
    cx, cy, radius = HEAD_CIRCLE
    heads = layer_report["heads"]
    n_heads = len(heads["activation_frequency"])
    positions = [(cx + radius * math.cos(2 * math.pi * i / n_heads - math.pi / 2),
                  cy + radius * math.sin(2 * math.pi * i / n_heads - math.pi / 2)) for i in range(n_heads)]
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
    experts = layer_report.get("experts")
    if experts is not None:
        n_experts = len(experts["load"])
        for e in range(n_experts):
            y = 30 + (height - 60) * (e / max(1, n_experts - 1) if n_experts > 1 else 0.5)
            size = 5 + 7 * math.sqrt(min(experts["utilisation"][e], 4.0))
            tops = _top_tokens(experts.get("top_tokens"), e, token_label)
            tip = (f"expert e{e}: load {experts['load'][e]:.3f} of assignments, utilisation "
                   f"{experts['utilisation'][e]:.2f}x ideal, {experts['assignment_count'][e]} assignments"
                   + (f"; top tokens {tops}" if tops else "") + _note(notes, ("expert", at, e)))
            parts.append(f'<circle class="node expert" cx="{EXPERT_X}" cy="{y:.1f}" r="{size:.1f}" '
                         f'fill="{COLOURS["expert"]}" data-tip="{attr(tip)}"/>'
                         f'<text x="{EXPERT_X + 16}" y="{y + 4:.1f}" class="label">e{e}</text>')
        parts.append(f'<text x="{EXPERT_X - 30}" y="14" class="note">routed experts</text>')
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
