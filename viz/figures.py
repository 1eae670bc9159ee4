"""What every picture shares: Agg figures, saving, the colour of each node kind, report access.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, never through ``pyplot``:
nothing global is touched, nothing needs a display, and a figure is freed when it is dropped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from ..routing import KIND_CROSS, KIND_DECODER, KIND_DECODER_SELF, KIND_ENCODER

COLOURS = {
    "shared head": "#4C72B0",
    "routed head": "#DD8452",
    "expert": "#55A868",
    "subtoken": "#8C8C8C",
    "value expert": "#8172B3",  # SwitchHead: each head's value and output experts
    "output expert": "#C44E52",
    "sparse head": "#937860",  # MoSA: heads that keep the top-k tokens of the sequence
    "flow": "#4C4C4C",
}
SAVE_FORMATS = (".png", ".svg", ".pdf")
# how titles name each attention kind of a routing report (gohgraph.analysis.stats.kinds);
# a decoder-only model's single kind is left unnamed, so its pictures read as they always did
KIND_TITLES = {
    KIND_ENCODER: "encoder self-attention",
    KIND_DECODER_SELF: "decoder self-attention",
    KIND_CROSS: "cross-attention",
}
DPI = 120
# room a suptitle leaves at each side of the figure, in inches (constrained layout's own pad is ~0.04)
TITLE_SIDE_MARGIN = 0.1


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width x height`` inches on its own Agg canvas."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: Optional[Union[str, Path]]) -> Optional[Path]:
    """Write ``figure`` to ``path`` (format from the suffix: PNG, SVG or PDF); ``None`` skips."""
    if path is None:
        return None
    path = Path(path)
    if path.suffix.lower() not in SAVE_FORMATS:
        raise ValueError(f"picture path {path} must end in one of {list(SAVE_FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def fitted_suptitle(figure: Figure, text: str, fontsize: float) -> Text:
    """Set ``figure``'s suptitle to ``text``, each line wrapped at spaces where it would run past the figure's edges.

    A suptitle is centred and constrained layout never wraps it, so a line wider than the figure is cut off at
    both edges. Each line is measured as drawn (same font and size, the figure's own renderer) and broken at the
    last space that keeps it within the figure's width less :data:`TITLE_SIDE_MARGIN` at each side; a title that
    already fits is left exactly as given. A single word wider than that stays whole.
    """
    room = (figure.get_figwidth() - 2 * TITLE_SIDE_MARGIN) * figure.dpi
    renderer = figure.canvas.get_renderer()
    probe = figure.text(0, 0, "", fontsize=fontsize)

    def fits(line: str) -> bool:
        probe.set_text(line)
        return probe.get_window_extent(renderer).width <= room

    wrapped = []
    for line in text.split("\n"):
        current = ""
        for word in line.split(" "):
            candidate = f"{current} {word}" if current else word
            if current and not fits(candidate):
                wrapped.append(current)
                current = word
            else:
                current = candidate
        wrapped.append(current)
    probe.remove()
    return figure.suptitle("\n".join(wrapped), fontsize=fontsize)


def as_report(stats: Any) -> Dict[str, Any]:
    """A :class:`~gohgraph.analysis.stats.collect.RoutingStats`, or its ``report()`` dict (e.g. read from stats.json)."""
    if isinstance(stats, dict):
        if "layers" not in stats or "config" not in stats:
            hint = (" (this one has a section per attention kind: draw each of report['kinds'], "
                    "see gohgraph.viz.kinds)" if "kinds" in stats else "")
            raise ValueError("stats dict must be a RoutingStats.report() (keys 'config' and 'layers')" + hint)
        return stats
    if hasattr(stats, "report"):
        return as_report(stats.report())
    raise ValueError(f"stats must be a RoutingStats or its report() dict, got {type(stats).__name__}")


def kind_prefix(kind: Optional[str]) -> str:
    """``"encoder self-attention: "`` for ``kind="encoder"`` etc.; ``""`` for ``None`` or ``"decoder"``."""
    if kind is None or kind == KIND_DECODER:
        return ""
    if kind not in KIND_TITLES:
        raise ValueError(f"kind={kind!r} is not an attention kind: one of {list(KIND_TITLES)} or None")
    return f"{KIND_TITLES[kind]}: "


def has_experts(report: Dict[str, Any]) -> bool:
    return any("experts" in layer for layer in report["layers"])


# SwitchHead: an owner's (head's or kv head's) experts cover this share of one head's slice of the
# head circle, in the matplotlib picture and in the report's SVG alike
ATTENTION_EXPERT_ARC = 0.75


def expert_arc_angles(centre: float, n_heads: int, n_experts: int) -> List[float]:
    """Angles of one owner's ``n_experts`` experts around the head circle: spread evenly over
    :data:`ATTENTION_EXPERT_ARC` of a head's slice (``2 pi / n_heads``) centred on ``centre``."""
    if n_experts == 1:
        return [centre]
    span = ATTENTION_EXPERT_ARC * 2 * math.pi / n_heads
    return [centre + span * (i / (n_experts - 1) - 0.5) for i in range(n_experts)]


def has_attention_experts(report: Dict[str, Any]) -> bool:
    """SwitchHead statistics: per head, the load of its value and output experts."""
    return any("attention_experts" in layer for layer in report["layers"])


def has_sparse_heads(report: Dict[str, Any]) -> bool:
    """MoSA statistics: per sparse head, the share of tokens it keeps."""
    return any("sparse_heads" in layer for layer in report["layers"])
