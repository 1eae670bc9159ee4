"""Load heatmaps: layers x heads (activation frequency) and layers x experts (utilisation).

Expert utilisation is load over the ideal load ``1 / n_routed_experts``, drawn on a diverging
scale centred on 1 so over- and under-used experts stand out in the same picture; dead experts
(never chosen) are labelled "dead".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from .figures import as_report, kind_prefix, new_figure, save_figure

ANNOTATE_MAX_CELLS = 256  # write the value in each cell only while it stays legible

HEAD_METRICS = ("activation_frequency", "mean_gate")


def head_load_heatmap(stats: Any, path: Optional[Union[str, Path]] = None,
                      metric: str = "activation_frequency", kind: Optional[str] = None) -> Figure:
    """``[layers, heads]`` heatmap of ``metric`` (``activation_frequency`` or ``mean_gate``);
    ``kind`` (an attention kind of :mod:`gohgraph.viz.kinds`, or ``None``) is named in the title."""
    if metric not in HEAD_METRICS:
        raise ValueError(f"metric={metric!r} is not one of {list(HEAD_METRICS)}")
    report = as_report(stats)
    values = np.array([layer["heads"][metric] for layer in report["layers"]], dtype=float)
    n_shared = report["config"]["n_shared_heads"]
    figure = new_figure(max(5.0, 1.6 + 0.5 * values.shape[1]), 1.2 + 0.4 * values.shape[0])
    ax = figure.add_subplot()
    vmax = 1.0 if metric == "activation_frequency" else max(float(values.max()), 1e-12)
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    _annotate(ax, image, values, "{:.2f}")
    _axes_labels(ax, values.shape, "head")
    if 0 < n_shared < values.shape[1]:
        ax.axvline(n_shared - 0.5, color="white", linewidth=2)  # shared | routed heads
    figure.colorbar(image, ax=ax, label=metric.replace("_", " "))
    shared_note = "" if not n_shared else " (head 0 shared, always on)" if n_shared == 1 else \
        f" (heads 0-{n_shared - 1} shared, always on)"
    ax.set_title(f"{kind_prefix(kind)}head {metric.replace('_', ' ')}{shared_note}", fontsize=10)
    save_figure(figure, path)
    return figure


def expert_load_heatmap(stats: Any, path: Optional[Union[str, Path]] = None, kind: Optional[str] = None) -> Figure:
    """``[layers, routed experts]`` heatmap of utilisation (1.0 = the ideal, equal share); ``kind``
    as in :func:`head_load_heatmap`."""
    report = as_report(stats)
    expert_layers = [layer for layer in report["layers"] if "experts" in layer]
    if not expert_layers:
        raise ValueError("these statistics have no experts (ffn='dense'): no expert load to draw")
    values = np.array([layer["experts"]["utilisation"] for layer in expert_layers], dtype=float)
    figure = new_figure(max(5.0, 1.8 + 0.45 * values.shape[1]), 1.4 + 0.4 * values.shape[0])
    ax = figure.add_subplot()
    vmax = max(2.0, float(values.max()))
    image = ax.imshow(values, cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=vmax), aspect="auto")
    _annotate(ax, image, values, "{:.2f}", zero_label="dead")
    _axes_labels(ax, values.shape, "expert", [layer["layer"] for layer in expert_layers])
    figure.colorbar(image, ax=ax, label="load / ideal load")
    entropies = ", ".join(f"{layer['experts']['load_entropy']:.2f}" for layer in expert_layers)
    ax.set_title(f"{kind_prefix(kind)}routed-expert utilisation (1 = equal share; dead = never chosen)\n"
                 f"load entropy per layer: {entropies}", fontsize=9)
    save_figure(figure, path)
    return figure


ABLATION_TITLES = {"head_off": "head forced off", "head_on": "head forced on", "expert_off": "expert forced off"}


def ablation_heatmap(ablation: Any, path: Optional[Union[str, Path]] = None, kind: str = "head_off") -> Figure:
    """``[layers, units]`` heatmap of the Δ validation loss of ``kind`` (``head_off``, ``head_on`` or
    ``expert_off``) from an :class:`~gohgraph.analysis.ablation.AblationReport` (or its ``to_dict()``):
    red cells are units the model needs (the loss rises without them), blue ones it does better
    without; blank cells were not measured (a dense layer, a shared head never forced on)."""
    if kind not in ABLATION_TITLES:
        raise ValueError(f"kind={kind!r} is not one of {list(ABLATION_TITLES)}")
    report = ablation if isinstance(ablation, dict) else ablation.to_dict()
    rows = [row for row in report["interventions"] if row["kind"] == kind]
    if not rows:
        raise ValueError(f"this ablation has no {kind} interventions to draw")
    n_units = max(int(row["unit"]) for row in rows) + 1
    values = np.full((report["n_layers"], n_units), np.nan)
    for row in rows:
        values[row["layer"], int(row["unit"])] = row["delta_loss"]
    figure = new_figure(max(5.0, 1.8 + 0.5 * n_units), 1.4 + 0.4 * values.shape[0])
    ax = figure.add_subplot()
    limit = max(float(np.nanmax(np.abs(values))), 1e-9)
    image = ax.imshow(values, cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit), aspect="auto")
    _annotate(ax, image, values, "{:+.3f}")
    _axes_labels(ax, values.shape, kind.split("_")[0])
    figure.colorbar(image, ax=ax, label="Δ loss (nats/token)")
    ax.set_title(f"Δ loss, {ABLATION_TITLES[kind]} (baseline {report['baseline_loss']:.4f} nats/token)", fontsize=9)
    save_figure(figure, path)
    return figure


def _annotate(ax: Axes, image: AxesImage, values: np.ndarray, fmt: str, zero_label: Optional[str] = None) -> None:
    if values.size > ANNOTATE_MAX_CELLS:
        return
    for (row, col), value in np.ndenumerate(values):
        if np.isnan(value):  # not measured: a blank cell
            continue
        red, green, blue, _ = image.cmap(image.norm(value))
        light_cell = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5
        text = zero_label if zero_label is not None and value == 0 else fmt.format(value)
        ax.text(col, row, text, ha="center", va="center", fontsize=7,
                color="black" if light_cell else "white")


def _axes_labels(ax: Axes, shape: tuple, column_name: str, layer_ids: Optional[list] = None) -> None:
    rows, cols = shape
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows), labels=layer_ids if layer_ids is not None else range(rows))
    ax.set_xlabel(column_name)
    ax.set_ylabel("layer")
