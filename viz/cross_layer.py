"""Across layers: transition matrices between consecutive layers, and load percentiles per layer.

:func:`cross_layer_heatmaps` draws, for each pair ``l -> l + 1``, ``P(choice in l + 1 | choice in
l)`` (the row-normalised co-occurrence of :mod:`gohgraph.analysis.stats.cross_layer`, every top-k
assignment counted). :func:`load_percentiles_figure` draws each layer's percentiles of load
(tokens per routed expert, or activations per routed head) as a band, as NeMo / Megatron report them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from matplotlib.figure import Figure

from .figures import as_report, fitted_suptitle, new_figure, save_figure


def cross_layer_heatmaps(stats: Any, kind: str = "auto", path: Optional[Union[str, Path]] = None) -> Figure:
    """One panel per consecutive layer pair of ``P(next | this)`` for experts or heads."""
    report = as_report(stats)
    pairs = report.get("cross_layer", [])
    if not pairs:
        raise ValueError("these statistics have no cross-layer section (one layer, or a report written before it)")
    if kind == "auto":
        kind = "experts" if all("experts" in pair for pair in pairs) else "heads"
    if kind not in ("experts", "heads") or not all(kind in pair for pair in pairs):
        raise ValueError(f"kind={kind!r}: the statistics hold {sorted(k for k in ('heads', 'experts') if k in pairs[0])}")
    prefix = "e" if kind == "experts" else "h"
    n = len(pairs[0][kind]["transition"])
    columns = min(3, len(pairs))
    rows = math.ceil(len(pairs) / columns)
    figure = new_figure(max(6.0, columns * (1.4 + 0.32 * n)), 1.0 + rows * (1.0 + 0.3 * n))
    axes = figure.subplots(rows, columns, squeeze=False)
    image = None
    for ax, pair in zip(axes.flat, pairs):
        first, second = pair["layers"]
        section = pair[kind]
        image = ax.imshow(np.array(section["transition"]), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(n), labels=[f"{prefix}{j}" for j in range(n)], fontsize=6)
        ax.set_yticks(range(n), labels=[f"{prefix}{i}" for i in range(n)], fontsize=6)
        ax.set_xlabel(f"layer {second}", fontsize=8)
        ax.set_ylabel(f"layer {first}", fontsize=8)
        share = section["top_successor_share"]
        independent = section["top_successor_share_if_independent"]
        note = "" if share is None else f"\ntop successor {share:.0%} (independent {independent:.0%})"
        ax.set_title(f"layer {first} \u2192 {second}{note}", fontsize=8)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    figure.colorbar(image, ax=axes, shrink=0.9).set_label(f"P({kind[:-1]} in next layer | {kind[:-1]} in this layer)",
                                                          fontsize=7)
    fitted_suptitle(figure, f"{kind[:-1]} co-occurrence across consecutive layers (every top-k assignment counted)",
                            fontsize=9)
    save_figure(figure, path)
    return figure


def load_percentiles_figure(stats: Any, path: Optional[Union[str, Path]] = None) -> Figure:
    """Per layer: min-max, p5-p95 and p25-p75 bands and the median of the load, plus the pooled median."""
    report = as_report(stats)
    percentiles = report["summary"].get("load_percentiles", {})
    panels = []
    if "experts" in percentiles:
        panels.append(("tokens per routed expert (assignments)", percentiles["experts"]["assignment_count"]))
    if "heads" in percentiles:
        panels.append(("activations per routed head", percentiles["heads"]["activation_count"]))
    if not panels:
        raise ValueError("these statistics have no load percentiles (no routed heads or experts)")
    figure = new_figure(4.6 * len(panels), 3.4)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, parts) in zip(axes, panels):
        per_layer = parts["per_layer"]
        x = [entry["layer"] for entry in per_layer]
        for low, high, alpha in (("min", "max", 0.15), ("p5", "p95", 0.3), ("p25", "p75", 0.5)):
            ax.fill_between(x, [e[low] for e in per_layer], [e[high] for e in per_layer], alpha=alpha,
                            color="#4C72B0", label=f"{low}-{high}", linewidth=0)
        ax.plot(x, [e["p50"] for e in per_layer], color="#4C72B0", marker="o", markersize=3, label="median")
        ax.axhline(parts["across_layers"]["p50"], color="#DD8452", linestyle="--", linewidth=1,
                   label="median across layers")
        ax.set_xticks(x)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("count", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6, frameon=False)
        ax.grid(alpha=0.3)
    fitted_suptitle(figure, f"load percentiles per layer ({report['tokens']:,} tokens, padding excluded)",
                            fontsize=9)
    save_figure(figure, path)
    return figure
