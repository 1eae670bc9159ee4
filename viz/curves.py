"""Training curves from a run's ``metrics.csv``.

The trainer writes one row per logged step (``step, tokens, lr, loss, lm_loss, aux_loss, ...,
val_loss, head_load_cv, expert_load_cv, active_heads``); validation columns are filled only on
validation steps; a run on several sources adds ``val_loss/<source>`` columns, drawn in a panel of
their own. Columns are grouped into panels by what they measure; a missing column, an
empty cell or an unknown extra column is fine, and each present numeric column is drawn once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

from matplotlib.figure import Figure

from ..training.metrics import SOURCE_LOSS_PREFIX
from ..training.metrics import read_metrics_columns as read_metrics_csv
from .figures import fitted_suptitle, new_figure, save_figure

X_COLUMNS = ("step", "iter", "iteration", "tokens")
PANELS: List[Tuple[str, Callable[[str], bool]]] = [
    ("loss (nats/token)", lambda name: name.endswith("loss") and "aux" not in name
     and not name.startswith(SOURCE_LOSS_PREFIX)),
    ("validation loss per source (nats/token)", lambda name: name.startswith(SOURCE_LOSS_PREFIX)),
    ("routing aux loss", lambda name: "aux" in name and name.endswith("loss")),
    # the bounded routing-health scalars (gohgraph.analysis.stats.health): one panel per routed kind
    ("routing health: heads", lambda name: name.startswith("health/heads/")),
    ("routing health: experts", lambda name: name.startswith("health/experts/")),
    ("load balance (CV, 0 = even)", lambda name: name.endswith("_cv") or "entropy" in name or "drop" in name),
    ("active heads per token", lambda name: name.startswith("active")),
    ("learning rate", lambda name: name in ("lr", "learning_rate")),
]
MAX_PANELS = 9


def training_curves(metrics_csv: Union[str, Path], path: Optional[Union[str, Path]] = None) -> Figure:
    """Loss, aux loss, load-balance and other curves of ``metrics_csv``, one panel per kind."""
    columns = read_metrics_csv(metrics_csv)
    x_name = next((name for name in X_COLUMNS if name in columns and _has_values(columns[name])), None)
    n_rows = max((len(values) for values in columns.values()), default=0)
    x_values = columns[x_name] if x_name else [float(i) for i in range(n_rows)]
    curves = [name for name, values in columns.items()
              if name not in X_COLUMNS and _has_values(values)]
    if not curves:
        raise ValueError(f"metrics CSV {metrics_csv} has no numeric column to draw besides "
                         f"{list(X_COLUMNS)}; expected columns like loss, lm_loss, aux_loss, val_loss, head_load_cv")
    panels = _group(curves)[:MAX_PANELS]
    n_cols = min(3, len(panels))
    n_panel_rows = math.ceil(len(panels) / n_cols)
    figure = new_figure(4.2 * n_cols, 3.0 * n_panel_rows)
    axes = figure.subplots(n_panel_rows, n_cols, squeeze=False)
    for ax, (title, names) in zip(axes.flat, panels):
        for name in names:
            points = [(x, y) for x, y in zip(x_values, columns[name]) if not (math.isnan(x) or math.isnan(y))]
            xs, ys = zip(*points)
            sparse = len(points) < 0.5 * n_rows  # e.g. val_loss, logged every few hundred steps
            ax.plot(xs, ys, label=name, marker="o" if sparse or len(points) == 1 else None, markersize=3,
                    linewidth=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(x_name or "row", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(names) > 1 or title != names[0]:
            ax.legend(fontsize=7, frameon=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fitted_suptitle(figure, f"training curves ({Path(metrics_csv).name})", fontsize=10)
    save_figure(figure, path)
    return figure


def _group(curves: List[str]) -> List[Tuple[str, List[str]]]:
    """Known kinds first (in PANELS order), then one panel per remaining column."""
    panels, placed = [], set()
    for title, belongs in PANELS:
        names = [name for name in curves if name not in placed and belongs(name)]
        if names:
            panels.append((title, names))
            placed.update(names)
    panels.extend((name, [name]) for name in curves if name not in placed)
    return panels


def _has_values(values: List[float]) -> bool:
    return any(not math.isnan(value) for value in values)
