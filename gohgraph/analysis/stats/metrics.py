"""Balance metrics of a load vector: how evenly heads or experts share the work.

A *load* is a vector ``[nodes]`` of non-negative shares that sum to 1 (for experts: the fraction
of routed sub-token assignments each expert received; for heads: the fraction of routed-head
selections). The metrics below are the ones MoE users ask for (docs/analysis.md): normalised entropy,
coefficient of variation, max/mean and min/mean load, the share taken by the busiest and the
idlest 20% of nodes, and the nodes that were never chosen.
"""

from __future__ import annotations

import math
from typing import Dict, List, Union

import torch

TAIL_FRACTION = 0.2  # "top-20% / bottom-20%" of nodes


def load_entropy(load: torch.Tensor) -> float:
    r"""Normalised entropy :math:`-\sum_i p_i \ln p_i / \ln n` of ``load [nodes]``, in ``[0, 1]``.

    ``1.0`` for a perfectly uniform load, ``0.0`` when one node takes everything. A single node
    is trivially balanced (``1.0``). ``load`` is renormalised to sum to 1; ``0 ln 0 = 0``.
    """
    p = _as_shares(load)
    if p.numel() <= 1:
        return 1.0
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum()
    return float(entropy / math.log(p.numel()))


def coefficient_of_variation(load: torch.Tensor) -> float:
    """Population standard deviation over mean of ``load [nodes]``; ``0.0`` when uniform."""
    p = _as_shares(load)
    return float(p.std(unbiased=False) / p.mean())


def tail_share(load: torch.Tensor, busiest: bool, fraction: float = TAIL_FRACTION) -> float:
    """Share of the load taken by the ``ceil(fraction * nodes)`` busiest (or idlest) nodes."""
    p = _as_shares(load)
    n_tail = max(1, math.ceil(fraction * p.numel()))
    return float(p.sort(descending=busiest).values[:n_tail].sum())


def load_balance_summary(load: torch.Tensor) -> Dict[str, Union[float, List[int]]]:
    """Every balance metric of ``load [nodes]`` (shares or raw counts) as plain Python values.

    Keys: ``load_entropy``, ``load_cv``, ``max_over_mean_load``, ``min_over_mean_load``,
    ``top20_share``, ``bottom20_share`` and ``dead`` (ids of nodes with zero load).
    """
    load = load.double()
    p = _as_shares(load)
    return {
        "load_entropy": load_entropy(p),
        "load_cv": coefficient_of_variation(p),
        "max_over_mean_load": float(p.max() / p.mean()),
        "min_over_mean_load": float(p.min() / p.mean()),
        "top20_share": tail_share(p, busiest=True),
        "bottom20_share": tail_share(p, busiest=False),
        "dead": [int(i) for i in torch.nonzero(load == 0).flatten().tolist()],
    }


def _as_shares(load: torch.Tensor) -> torch.Tensor:
    load = torch.as_tensor(load, dtype=torch.float64).flatten()
    if load.numel() == 0:
        raise ValueError("load must name at least one node")
    if (load < 0).any():
        raise ValueError("load must be non-negative")
    total = load.sum()
    if total <= 0:
        raise ValueError("load is all zero: no node was ever chosen")
    return load / total
