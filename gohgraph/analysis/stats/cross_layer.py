r"""Across layers: which head / expert of layer ``l + 1`` follows which of layer ``l``, per token.

For consecutive layers ``l, l+1`` and one token, let ``a_i`` be how often node ``i`` was chosen in
layer ``l`` (heads: ``1`` if head ``i`` is active; experts: the number of the token's
sub-token top-k assignments to expert ``i``, so every top-k assignment counts) and ``b_j`` the same
in layer ``l + 1``, with ``|b| = \sum_j b_j``. The co-occurrence matrix sums over real tokens

.. math::  C^{(l)}_{ij} = \sum_t a_i(t) \, b_j(t) / |b(t)|,

every pair of a choice in ``l`` with a choice in ``l + 1`` counted, each token's pairs weighted so
that it hands each of its layer-``l`` choices on as one unit. So row ``i`` sums to the number of
times ``i`` was chosen in layer ``l`` (its load in counts: ``activation_count`` /
``assignment_count`` of that layer), and with ``m`` sub-tokens and top-``k`` fixed the columns sum
to layer ``l + 1``'s counts. With one sub-token and top-1 it is plainly the number of tokens that
went from expert ``i`` to expert ``j``. Tokens with no choice in ``l + 1`` add nothing.

Routing consistency, from ``C`` over routed nodes (shared heads are always on and would be
everyone's successor), with ``P = C / \sum C``:

* ``top_successor_share`` = :math:`\sum_i \max_j C_{ij} / \sum_{ij} C_{ij}`, the share of
  choices whose next-layer choice is their node's most frequent successor; compare it with
* ``top_successor_share_if_independent`` = :math:`\max_j \sum_i P_{ij}`: the same share if layer
  ``l + 1`` ignored layer ``l`` (rows proportional to the column sums);
* ``uncertainty_coefficient`` = :math:`I(X; Y) / H(Y)` of the pair distribution ``P`` (natural
  logs): 0 = the next layer's choice is independent of this one, 1 = fully determined by it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from ...routing import LayerRouting


class CrossLayerTally:
    """Running float64 co-occurrence sums between consecutive layers (records without padding)."""

    def __init__(self, n_layers: int, n_heads: int, n_shared_heads: int, n_routed_experts: int) -> None:
        self.n_heads, self.n_shared_heads, self.n_routed_experts = n_heads, n_shared_heads, n_routed_experts
        pairs = max(0, n_layers - 1)
        self.head_cooccurrence = torch.zeros(pairs, n_heads, n_heads, dtype=torch.float64)
        self.expert_cooccurrence: List[Optional[torch.Tensor]] = [None] * pairs

    def add(self, routing: Sequence[LayerRouting]) -> None:
        """Add one batch: ``routing`` is one record per layer, padding already removed."""
        active = [(record.head_gates > 0).reshape(-1, record.head_gates.shape[-1]).double() for record in routing]
        experts = [None if record.expert_indices is None else expert_counts(record.expert_indices,
                                                                            self.n_routed_experts)
                   for record in routing]
        for layer in range(len(routing) - 1):
            self.head_cooccurrence[layer] += handover(active[layer], active[layer + 1]).cpu()
            if experts[layer] is not None and experts[layer + 1] is not None:
                counts = handover(experts[layer], experts[layer + 1]).cpu()
                if self.expert_cooccurrence[layer] is None:
                    self.expert_cooccurrence[layer] = torch.zeros_like(counts)
                self.expert_cooccurrence[layer] += counts

    def report(self) -> List[Dict[str, Any]]:
        """Per consecutive pair ``{"layers": [l, l+1], "heads": {...}, "experts"?: {...}}``."""
        out = []
        routed = slice(self.n_shared_heads, None)
        for layer, heads in enumerate(self.head_cooccurrence):
            entry: Dict[str, Any] = {"layers": [layer, layer + 1], "heads": {
                "cooccurrence": _rows(heads), "transition": _rows(_row_normalised(heads)),
                **consistency(heads[routed, routed])}}
            experts = self.expert_cooccurrence[layer]
            if experts is not None:
                entry["experts"] = {"cooccurrence": _rows(experts), "transition": _rows(_row_normalised(experts)),
                                    **consistency(experts)}
            out.append(entry)
        return out


def expert_counts(expert_indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """``[batch, seq, m, k]`` routed ids -> ``[tokens, n_experts]`` assignments per token and expert."""
    flat = expert_indices.reshape(-1, expert_indices.shape[2] * expert_indices.shape[3]).long()
    counts = torch.zeros(flat.shape[0], n_experts, dtype=torch.float64, device=flat.device)
    return counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))


def handover(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    r"""``[tokens, n] x [tokens, n'] -> [n, n']``: :math:`\sum_t a_i(t) b_j(t) / |b(t)|` (module docstring)."""
    per_token = second.sum(1, keepdim=True)
    return first.t() @ torch.where(per_token > 0, second / per_token.clamp(min=1e-300), torch.zeros_like(second))


def consistency(cooccurrence: torch.Tensor) -> Dict[str, Optional[float]]:
    """``top_successor_share``, its value under independence and the uncertainty coefficient of
    ``cooccurrence [n, n']`` (module docstring); ``None`` where there is nothing to measure."""
    total = float(cooccurrence.sum())
    if total <= 0 or cooccurrence.numel() == 0:
        return {"top_successor_share": None, "top_successor_share_if_independent": None,
                "uncertainty_coefficient": None}
    joint = cooccurrence / total
    rows, columns = joint.sum(1), joint.sum(0)
    nonzero = joint > 0
    mutual = float((joint[nonzero] * (joint[nonzero] / (rows[:, None] * columns[None, :])[nonzero]).log()).sum())
    column_entropy = float(-(columns[columns > 0] * columns[columns > 0].log()).sum())
    return {
        "top_successor_share": float(joint.max(1).values.sum()),
        "top_successor_share_if_independent": float(columns.max()),
        # one possible successor: its choice is fully determined, nothing is uncertain
        "uncertainty_coefficient": max(0.0, mutual / column_entropy) if column_entropy > 1e-12 else 1.0,
    }


def _row_normalised(matrix: torch.Tensor) -> torch.Tensor:
    """``P(next = j | this = i)``; rows of nodes never chosen stay 0."""
    return matrix / matrix.sum(1, keepdim=True).clamp(min=1e-300)


def _rows(matrix: torch.Tensor) -> List[List[float]]:
    return [[float(v) for v in row] for row in matrix.tolist()]
