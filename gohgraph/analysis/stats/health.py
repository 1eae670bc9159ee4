"""Bounded routing-health scalars: a fixed handful of numbers per routed kind, whatever the units.

:func:`routing_health` reads the layers' routing records (:class:`~gohgraph.routing.LayerRouting`)
of one batch and returns, for each routed kind (:data:`KINDS`: ``"heads"``, ``"experts"``), the
scalars of :data:`STATS`, summarised over layers, so ``metrics.csv`` has the same columns
(:data:`HEALTH_COLUMNS`) for 4 experts or 256. Per layer, with ``load[u]`` the hard count of
(token, unit) selections of routed unit ``u`` (shared heads and experts, always on, are not
counted) and ``U`` the number of routed units:

* ``util_min`` / ``util_max``: ``load[u] / (sum(load) / U)`` (load over the fair share, which is
  ``k * tokens / U`` when every token picks ``k`` units); minimum over layers of the per-layer
  minimum, maximum over layers of the per-layer maximum.
* ``dead``: share of routed units with zero load.
* ``entropy``: entropy of ``load / sum(load)`` over ``ln U`` (1 = even).
* ``max_share``: ``max(load) / sum(load)``.
* ``gate_gap``: L1 distance between the normalised gate mass per unit (sum of the record's gates:
  ``head_gates``, or ``expert_weights`` added at their ``expert_indices``) and the normalised
  hard load; 0 when the gates weigh every unit as often as it is picked.
* ``margin``: mean over tokens of the k-th minus the (k+1)-th largest routed logit (``k`` the
  token's number of active routed units); for experts, over sub-tokens, of the selection score
  that top-k ranked (the logit, plus the auxiliary-loss-free bias where one is used:
  ``router_margins`` of the record), leaving out sub-tokens whose (k+1)-th expert was forbidden.
  ``nan`` for a layer whose tokens pick every unit.
* ``input_rms``: RMS of the router's input over real tokens (``router_input_rms`` of the record,
  written by the head router and by the expert layer: its sub-tokens).

Every statistic but ``util_min`` / ``util_max`` is the mean over layers. A kind absent from the
model (dense router, dense FFN) or a value that cannot be computed is ``nan`` (an empty cell in
``metrics.csv``). Only real tokens count when ``token_mask [batch, seq]`` is given.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

from .metrics import load_entropy

KINDS = ("heads", "experts")
STATS = ("util_min", "util_max", "dead", "entropy", "max_share", "gate_gap", "margin", "input_rms")
HEALTH_PREFIX = "health/"
HEALTH_COLUMNS = [f"{HEALTH_PREFIX}{kind}/{stat}" for kind in KINDS for stat in STATS]


def health_column(kind: str, stat: str) -> str:
    """The ``metrics.csv`` column (and TensorBoard tag) of one kind's statistic."""
    return f"{HEALTH_PREFIX}{kind}/{stat}"


def layer_health(load: torch.Tensor, gate_mass: Optional[torch.Tensor] = None,
                 margins: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """The per-layer statistics of one kind from ``load [units]`` (hard counts), ``gate_mass
    [units]`` (summed gates, or ``None``) and ``margins [tokens]`` (or ``None``); ``nan`` where
    the load is all zero (no token was routed)."""
    load = load.double().flatten()
    units, total = load.numel(), float(load.sum())
    nan = math.nan
    if units == 0 or total <= 0:
        return {stat: nan for stat in STATS if stat != "input_rms"}
    share = load / total
    gap = nan
    if gate_mass is not None and float(gate_mass.sum()) > 0:
        gap = float((gate_mass.double().flatten() / gate_mass.double().sum() - share).abs().sum())
    return {
        "util_min": float(share.min() * units),
        "util_max": float(share.max() * units),
        "dead": float((load == 0).double().mean()),
        "entropy": load_entropy(load),
        "max_share": float(share.max()),
        "gate_gap": gap,
        "margin": float(margins.double().mean()) if margins is not None and margins.numel() else nan,
    }


def _head_layer(record, n_shared_heads: int, valid: Optional[torch.Tensor]) -> Optional[Dict[str, float]]:
    if record.head_logits is None:  # dense router: nothing is routed
        return None
    gates = record.head_gates[..., n_shared_heads:].detach().cpu().double()
    units = gates.shape[-1]
    if units < 2:
        return None
    gates = gates.reshape(-1, units)
    logits = record.head_logits[..., n_shared_heads:].detach().cpu().double().reshape(-1, units)
    if valid is not None:
        gates, logits = gates[valid], logits[valid]
    active = gates > 0
    k = active.sum(-1)  # [tokens] routed heads each token took
    has_next = (k > 0) & (k < units)
    margins = None
    if bool(has_next.any()):
        ordered = logits[has_next].sort(dim=-1, descending=True).values
        kk = k[has_next].unsqueeze(-1)
        margins = (ordered.gather(-1, kk - 1) - ordered.gather(-1, kk)).squeeze(-1)
    stats = layer_health(active.double().sum(0), gates.sum(0), margins)
    rms = getattr(record, "router_input_rms", None)
    stats["input_rms"] = math.nan if rms is None else float(rms)
    return stats


def _expert_layer(record, n_experts: Optional[int], valid: Optional[torch.Tensor]) -> Optional[Dict[str, float]]:
    experts = record.experts
    if experts is None:
        return None
    indices = experts.expert_indices.detach().cpu()
    weights = None if experts.expert_weights is None else experts.expert_weights.detach().cpu().double()
    if valid is not None:  # [batch, seq, subtokens, k]: keep real tokens
        indices = indices.reshape(valid.numel(), -1)[valid]
        weights = None if weights is None else weights.reshape(valid.numel(), -1)[valid]
    indices = indices.reshape(-1).long()
    if n_experts is None:
        counts = getattr(experts.balance, "counts", None)
        n_experts = counts.numel() if counts is not None else int(indices.max()) + 1 if indices.numel() else 0
    if n_experts < 1:
        return None
    load = torch.zeros(n_experts, dtype=torch.float64).index_add_(
        0, indices, torch.ones(indices.numel(), dtype=torch.float64))
    gate_mass = None
    if weights is not None:
        gate_mass = torch.zeros(n_experts, dtype=torch.float64).index_add_(0, indices, weights.reshape(-1))
    margins = getattr(experts, "router_margins", None)
    if margins is not None:  # [batch, seq, subtokens]: real tokens' sub-tokens whose (k+1)-th expert could be chosen
        margins = margins.detach().cpu().double()
        margins = (margins.reshape(valid.numel(), -1)[valid] if valid is not None else margins).reshape(-1)
        margins = margins[torch.isfinite(margins)]
    stats = layer_health(load, gate_mass, margins)
    rms = getattr(experts, "router_input_rms", None)
    stats["input_rms"] = math.nan if rms is None else float(rms)
    return stats


@torch.no_grad()
def routing_health(records: Sequence, n_shared_heads: int = 0, n_routed_experts: Optional[int] = None,
                   token_mask: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Every column of :data:`HEALTH_COLUMNS` for the layers' routing ``records`` (see the module
    docstring); ``n_routed_experts`` sizes the expert load (so never-chosen experts count as dead;
    read from the balance tally, else from the largest id, when ``None``)."""
    valid = None if token_mask is None else token_mask.reshape(-1).bool().cpu()
    per_kind: Dict[str, List[Dict[str, float]]] = {kind: [] for kind in KINDS}
    for record in records:
        heads = _head_layer(record, n_shared_heads, valid)
        if heads is not None:
            per_kind["heads"].append(heads)
        experts = _expert_layer(record, n_routed_experts, valid)
        if experts is not None:
            per_kind["experts"].append(experts)
    out: Dict[str, float] = {}
    for kind in KINDS:
        layers = per_kind[kind]
        for stat in STATS:
            values = [layer[stat] for layer in layers if not math.isnan(layer[stat])]
            if not values:
                value = math.nan
            elif stat == "util_min":
                value = min(values)
            elif stat == "util_max":
                value = max(values)
            else:
                value = sum(values) / len(values)
            out[health_column(kind, stat)] = value
    return out
