"""What the HTML report says about each unit beyond its load: its Δ loss and the tokens it promotes.

Two optional inputs, both JSON-ready dicts:

* ``ablation`` - ``gohgraph ablate``'s ``ablation.json`` (an
  :class:`~gohgraph.analysis.ablation.AblationReport`'s ``to_dict()``): Δ validation loss with each
  head forced off / on and each expert forced off, the k and message ablations;
* ``logit_lens`` - ``{"heads": {layer: {head: rows}}, "experts": {layer: {expert: rows}}}``, the
  head and expert logit lenses (:mod:`gohgraph.analysis.logit_lens`), ``rows`` = ``[[token id,
  score, ...], ...]`` best first.

:func:`unit_notes` turns them into one hover line per unit ``(kind, layer, unit)``, which the
routing graphs append to their tooltips; :func:`ablation_section` draws the Δ loss heatmaps (each
cell's hover names its Δ loss and top tokens) and lists the model-wide interventions.
"""

from __future__ import annotations

import html
from typing import Any, Callable, Dict, List, Optional, Tuple

from .html_svg import heatmap_svg

NoteKey = Tuple[str, int, int]  # ("head" | "expert", layer, unit id)
LENS_SHOWN = 5  # top tokens a hover line lists
DELTA_KINDS = (("head_off", "head", "forced off"), ("head_on", "head", "forced on"),
               ("expert_off", "expert", "forced off"))


def check_ablation(ablation: Any) -> Dict[str, Any]:
    """``ablation`` if it has the fields of ``AblationReport.to_dict()``; else a one-line ``ValueError``."""
    needed = ("baseline_loss", "n_layers", "n_heads", "interventions")
    if not isinstance(ablation, dict) or any(name not in ablation for name in needed):
        raise ValueError(f"ablation must be gohgraph ablate's ablation.json (keys {list(needed)})")
    return ablation


def deltas(ablation: Dict[str, Any]) -> Dict[Tuple[str, int, int], float]:
    """``{(intervention kind, layer, unit): Δ loss}`` of the per-unit interventions."""
    found = {}
    for row in ablation["interventions"]:
        if row["kind"] in {kind for kind, _, _ in DELTA_KINDS}:
            found[(row["kind"], int(row["layer"]), int(row["unit"]))] = float(row["delta_loss"])
    return found


def lens_tokens(logit_lens: Optional[Dict[str, Any]], kind: str, layer: int, unit: int,
                label: Callable[[int], str]) -> str:
    """The first :data:`LENS_SHOWN` tokens ``unit`` promotes, as labels, or ``""``."""
    rows = ((logit_lens or {}).get(kind + "s", {}).get(str(layer), {}).get(str(unit)) or [])[:LENS_SHOWN]
    return ", ".join(label(int(row[0])) for row in rows)


def unit_notes(ablation: Optional[Dict[str, Any]], logit_lens: Optional[Dict[str, Any]],
               label: Callable[[int], str]) -> Dict[NoteKey, str]:
    """One line per unit: ``Δ loss off +0.0123, on -0.0040; promotes a, b, c`` (parts it has)."""
    found = deltas(ablation) if ablation is not None else {}
    unit_kinds = {kind: unit_kind for kind, unit_kind, _ in DELTA_KINDS}
    keys = {(unit_kinds[kind], layer, unit) for kind, layer, unit in found}
    for kind in ("head", "expert"):
        for layer, units in (logit_lens or {}).get(kind + "s", {}).items():
            keys |= {(kind, int(layer), int(unit)) for unit in units}
    notes = {}
    for unit_kind, layer, unit in keys:
        parts = [f"{how.split()[1]} {found[(kind, layer, unit)]:+.4f}" for kind, k, how in DELTA_KINDS
                 if k == unit_kind and (kind, layer, unit) in found]
        line = f"Δ loss {', '.join(parts)} nats/token" if parts else ""
        tokens = lens_tokens(logit_lens, unit_kind, layer, unit, label)
        if tokens:
            line += ("; " if line else "") + f"promotes {tokens}"
        if line:
            notes[(unit_kind, layer, unit)] = line
    return notes


def ablation_section(ablation: Dict[str, Any], logit_lens: Optional[Dict[str, Any]],
                     label: Callable[[int], str], colour: Callable[[Optional[float]], str]) -> str:
    """Δ loss heatmaps (layers x units) per per-unit intervention, then the model-wide rows."""
    found = deltas(ablation)
    parts: List[str] = []
    for kind, unit_kind, how in DELTA_KINDS:
        cells = {(layer, unit): value for (k, layer, unit), value in found.items() if k == kind}
        if not cells:
            continue
        layers = sorted({layer for layer, _ in cells})
        n_units = max(unit for _, unit in cells) + 1
        values = [[cells.get((layer, unit)) for unit in range(n_units)] for layer in layers]
        prefix = unit_kind[0]

        def tip(i, j, value, layers=layers, unit_kind=unit_kind, how=how, prefix=prefix):
            if value is None:
                return f"layer {layers[i]}, {unit_kind} {prefix}{j}: not measured"
            tokens = lens_tokens(logit_lens, unit_kind, layers[i], j, label)
            return (f"layer {layers[i]}, {unit_kind} {prefix}{j} {how}: Δ loss {value:+.4f} nats/token"
                    + (f"; promotes {tokens}" if tokens else ""))

        parts.append(heatmap_svg(values, [f"layer {layer}" for layer in layers],
                                 [f"{prefix}{unit}" for unit in range(n_units)], colour, tip,
                                 f"Δ loss, {unit_kind} {how}", cell=40, fmt="{:+.3f}"))
    wide = [row for row in ablation["interventions"] if row["layer"] is None]
    if wide:
        rows = "".join(f"<tr><td>{html.escape(str(row['kind']))}</td><td>{html.escape(str(row['unit']))}</td>"
                       f"<td>{row['delta_loss']:+.4f}</td><td>"
                       f"{'' if row['changed_decisions'] is None else format(row['changed_decisions'], '.1%')}"
                       "</td></tr>" for row in wide)
        parts.append('<table class="ablation-wide"><tr><th>every layer</th><th>setting</th><th>Δ loss</th>'
                     f"<th>decisions changed</th></tr>{rows}</table>")
    return "".join(parts)


def lens_table(logit_lens: Dict[str, Any], label: Callable[[int], str]) -> str:
    """A table: layer, unit, the tokens it promotes (heads first, then experts)."""
    rows = []
    for kind, prefix in (("heads", "h"), ("experts", "e")):
        for layer, units in logit_lens.get(kind, {}).items():
            for unit, tokens in units.items():
                shown = ", ".join(label(int(row[0])) for row in tokens[:LENS_SHOWN]) or "(never active)"
                rows.append(f'<tr data-unit="{prefix}{unit}" data-layer="{layer}"><td>layer {layer}</td>'
                            f"<td>{prefix}{unit}</td><td>{html.escape(shown)}</td></tr>")
    return f'<table class="lens"><tr><th>layer</th><th>unit</th><th>top tokens</th></tr>{"".join(rows)}</table>'
