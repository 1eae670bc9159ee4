"""Router saturation over a run's checkpoints: one line per layer, saturation against the step.

Draws the ``saturation`` section of ``gohgraph stats`` (:func:`gohgraph.analysis.saturation.routing_saturation`):
for heads and for experts, a panel whose lines give, per layer, the share of the final model's
routing choices each kept checkpoint already makes (1 = settled), as OLMoE's saturation figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

from matplotlib.figure import Figure

from .figures import fitted_suptitle, new_figure, save_figure

UNIT_KINDS = ("heads", "experts")


def saturation_figure(saturation: Dict[str, Any], path: Optional[Union[str, Path]] = None) -> Figure:
    """Saturation against the checkpoint step, one line per layer, a panel per routed kind."""
    if not isinstance(saturation, dict) or not saturation.get("checkpoints"):
        raise ValueError("saturation must be routing_saturation()'s dict with at least one checkpoint")
    entries = sorted(saturation["checkpoints"], key=lambda entry: entry["step"])
    kinds = [kind for kind in UNIT_KINDS if any(entry[kind] is not None for entry in entries)]
    if not kinds:
        raise ValueError("this saturation measured no routed heads or experts")
    figure = new_figure(4.2 * len(kinds) + 0.6, 3.4)
    axes = figure.subplots(1, len(kinds), squeeze=False)[0]
    steps = [entry["step"] for entry in entries]
    for ax, kind in zip(axes, kinds):
        for layer in range(len(entries[0]["layers"])):
            values = [entry["layers"][layer][kind] for entry in entries]
            if all(value is None for value in values):
                continue
            ax.plot(steps, [float("nan") if v is None else v for v in values], marker="o", markersize=3,
                    label=f"layer {layer}")
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("checkpoint step")
        ax.set_ylabel("share of the final model's choices")
        ax.set_title(f"{kind}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fitted_suptitle(figure, f"router saturation over {len(entries)} checkpoints "
                            f"({saturation.get('tokens', '?')} validation tokens)", fontsize=9)
    save_figure(figure, path)
    return figure
