"""Specialisation by source: a ``[sources, experts]`` (or heads) heatmap per layer, OLMoE-style.

The score (:mod:`gohgraph.analysis.stats.by_source`) is a ratio, 1 = no preference, so it is drawn
on a logarithmic diverging scale centred on 1: red = the node prefers the source, blue = avoids it,
grey = the node was never chosen (undefined).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from .figures import as_report, fitted_suptitle, new_figure, save_figure

SCORE_RANGE = 4.0  # colours saturate at 1/4 and 4x
ANNOTATE_MAX_CELLS = 160


def specialisation_heatmap(stats: Any, kind: str = "auto", path: Optional[Union[str, Path]] = None) -> Figure:
    """One panel per layer: sources (rows) x routed experts or heads (columns) of the specialisation score.

    ``kind``: ``"experts"``, ``"heads"`` or ``"auto"`` (experts when the model has them).
    """
    report = as_report(stats)
    if "by_source" not in report:
        raise ValueError("these statistics were not collected by source: use gohgraph stats --by-source "
                         "(or collect_routing_stats_by_source) to get the specialisation")
    layers = report["by_source"]["layers"]
    if kind == "auto":
        kind = "experts" if all("experts" in layer for layer in layers) else "heads"
    if kind not in ("experts", "heads"):
        raise ValueError(f"kind={kind!r} is not one of ['auto', 'experts', 'heads']")
    if kind == "experts" and not all("experts" in layer for layer in layers):
        raise ValueError("these statistics have no experts (ffn='dense'): draw kind='heads'")
    sources = report["by_source"]["sources"]
    n_nodes = len(layers[0][kind]["specialisation"][sources[0]])
    columns = min(len(layers), 2)
    rows = math.ceil(len(layers) / columns)
    figure = new_figure(max(6.0, columns * (1.6 + 0.42 * n_nodes)), 0.9 + rows * (0.8 + 0.38 * len(sources)))
    axes = figure.subplots(rows, columns, squeeze=False)
    norm = LogNorm(vmin=1 / SCORE_RANGE, vmax=SCORE_RANGE)
    cmap = colormaps["RdBu_r"].with_extremes(bad="#d9d9d9")
    prefix = "e" if kind == "experts" else "h"
    image = None
    for ax, layer in zip(axes.flat, layers):
        values = np.array([[np.nan if v is None else v for v in layer[kind]["specialisation"][s]] for s in sources])
        clipped = np.clip(values, 1 / SCORE_RANGE, SCORE_RANGE)
        image = ax.imshow(np.ma.masked_invalid(clipped), cmap=cmap, norm=norm, aspect="auto")
        if values.size <= ANNOTATE_MAX_CELLS:
            for (i, j), value in np.ndenumerate(values):
                ax.text(j, i, "-" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(n_nodes), labels=[f"{prefix}{j}" for j in range(n_nodes)], fontsize=7)
        ax.set_yticks(range(len(sources)), labels=sources, fontsize=7)
        ax.set_xlabel("routed expert" if kind == "experts" else "head", fontsize=8)
        ax.set_ylabel("source", fontsize=8)
        ax.set_title(f"layer {layer['layer']}", fontsize=9)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    bar = figure.colorbar(image, ax=axes, shrink=0.9)
    ticks = [1 / SCORE_RANGE, 0.5, 1.0, 2.0, SCORE_RANGE]
    bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks], fontsize=7)
    bar.ax.minorticks_off()
    bar.set_label("specialisation (1 = no preference)", fontsize=7)
    tokens = ", ".join(f"{s} {n:,}" for s, n in report["by_source"]["tokens"].items())
    fitted_suptitle(figure, f"{kind[:-1]} specialisation by source (tokens: {tokens})\n(share of the {kind[:-1]}'s "
                            "tokens from the source) / (the source's share of all tokens)", fontsize=9)
    save_figure(figure, path)
    return figure
