r"""Token specialisation: how spread out each token id's routing is, layer by layer.

From a layer's :class:`~gohgraph.analysis.stats.tokens.TokenProfile` counts ``N[v, x]`` (how
often token id ``v`` chose node ``x``: a routed head it activated, or a routed expert one of its
sub-tokens was assigned to, every top-k assignment counted; padding never counts), the routing
distribution of ``v`` is :math:`p_v(x) = N[v, x] / \sum_x N[v, x]` and its entropy, in nats,

.. math::  H(v) = -\sum_x p_v(x) \ln p_v(x).

With top-``k`` routing over ``n`` nodes, :math:`H(v) = \ln k` when every occurrence of ``v`` picks
the same ``k`` nodes (a fully specialised token) and :math:`\ln n` when its picks are spread evenly
over all nodes; the report gives :math:`\ln n` as ``head_entropy_max`` / ``expert_entropy_max``. Shared heads are left out (always on, they
would add the same constant to every token).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch


def routing_entropy(counts: torch.Tensor) -> torch.Tensor:
    """``counts [vocab, nodes]`` -> ``[vocab]`` entropy (nats) of each row's distribution; ``nan`` for empty rows."""
    counts = counts.double()
    totals = counts.sum(1, keepdim=True)
    p = counts / totals.clamp(min=1e-300)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(1)
    return torch.where(totals[:, 0] > 0, entropy, torch.full_like(entropy, float("nan")))


def token_entropy_report(occurrences: torch.Tensor, head_counts: Optional[torch.Tensor],
                         expert_counts: Optional[torch.Tensor]) -> Dict[str, Any]:
    """Per seen token id: ``occurrences`` (real tokens of that id) and the entropy of its routed-head
    and expert choices; plus each entropy's mean weighted by occurrences.

    ``occurrences [vocab]``; ``head_counts [vocab, routed heads]`` and ``expert_counts [vocab,
    routed experts]`` (either may be ``None``).
    """
    seen = torch.nonzero(occurrences > 0).flatten()
    out: Dict[str, Any] = {"token_id": [int(v) for v in seen.tolist()],
                           "occurrences": [int(round(float(occurrences[v]))) for v in seen.tolist()]}
    weights = occurrences[seen].double()
    for name, counts in (("head", head_counts), ("expert", expert_counts)):
        if counts is None or counts.shape[1] < 2:
            continue
        entropy = routing_entropy(counts)[seen]
        finite = ~torch.isnan(entropy)
        out[f"{name}_entropy"] = [None if math.isnan(v) else float(v) for v in entropy.tolist()]
        out[f"{name}_entropy_max"] = math.log(counts.shape[1])
        if finite.any():
            out[f"mean_{name}_entropy"] = float((entropy[finite] * weights[finite]).sum() / weights[finite].sum())
    return out
