"""Within-layer co-activation: ``P(b | a)`` per layer for heads or experts (OLMoE's co-activation figure).

Row ``a``, column ``b`` is the share of the routing decisions that chose unit ``a`` which chose ``b``
too (:mod:`gohgraph.analysis.stats.coactivation`; for experts one decision per sub-token). The
diagonal is 1; grey rows are units never chosen. One panel per layer, or only the ``layer`` asked for.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from matplotlib.figure import Figure

from .figures import as_report, fitted_suptitle, kind_prefix, new_figure, save_figure

COACTIVATION_KINDS = ("heads", "experts")
PANEL_COLUMNS = 3


def coactivation_heatmaps(stats: Any, kind: str = "heads", layer: Optional[int] = None,
                          path: Optional[Union[str, Path]] = None, attention_kind: Optional[str] = None) -> Figure:
    """``P(b | a)`` heatmaps of ``kind`` (``"heads"`` or ``"experts"``), one panel per layer that has
    them, or only layer ``layer``; ``attention_kind`` names a seq2seq attention kind in the title."""
    if kind not in COACTIVATION_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {list(COACTIVATION_KINDS)}")
    report = as_report(stats)
    layers = [entry for entry in report["layers"] if "coactivation_given" in entry.get(kind, {})]
    if not layers:
        raise ValueError(f"these statistics have no {kind} co-activation (no {kind} routed, or a report "
                         "written before P(b | a) was added)")
    if layer is not None:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layer={layer!r} must be an int")
        chosen = [entry for entry in layers if entry["layer"] == layer]
        if not chosen:
            raise ValueError(f"layer={layer} is not one of the layers with {kind}: {[e['layer'] for e in layers]}")
        layers = chosen
    prefix = "e" if kind == "experts" else "h"
    n = len(layers[0][kind]["coactivation_given"])
    columns = min(PANEL_COLUMNS, len(layers))
    rows = math.ceil(len(layers) / columns)
    figure = new_figure(max(4.5, columns * (1.6 + 0.32 * n)), 1.0 + rows * (1.2 + 0.3 * n))
    axes = figure.subplots(rows, columns, squeeze=False)
    image = None
    for ax, entry in zip(axes.flat, layers):
        values = np.array([[np.nan if v is None else v for v in row] for row in entry[kind]["coactivation_given"]],
                          dtype=float)
        masked = np.ma.masked_invalid(values)
        image = ax.imshow(masked, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_facecolor("#dddddd")  # rows of units never chosen
        labels = [f"{prefix}{i}" for i in range(n)]
        ax.set_xticks(range(n), labels=labels, fontsize=6)
        ax.set_yticks(range(n), labels=labels, fontsize=6)
        ax.set_xlabel(f"b ({kind[:-1]} also chosen)", fontsize=7)
        ax.set_ylabel(f"a ({kind[:-1]} chosen)", fontsize=7)
        ax.set_title(f"layer {entry['layer']}", fontsize=8)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    figure.colorbar(image, ax=axes, shrink=0.9).set_label("P(b | a)", fontsize=7)
    decision = "sub-token" if kind == "experts" else "token"
    fitted_suptitle(figure, f"{kind_prefix(attention_kind)}{kind[:-1]} co-activation within a layer, "
                            f"P(b | a) per {decision} decision", fontsize=9)
    save_figure(figure, path)
    return figure
