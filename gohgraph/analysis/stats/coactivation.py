r"""Within-layer co-activation as a conditional probability, P(b | a) (OLMoE's co-activation analysis).

A tally keeps the joint counts :math:`J_{ab}` = the number of routing decisions that select both
unit ``a`` and unit ``b`` (``J_{aa}``: the decisions that select ``a``). For heads a decision is a
token's set of active heads; for experts it is one sub-token's top-``k`` set (with one sub-token per
token, a token's). The conditional co-activation is

.. math::
    P(b \mid a) = \frac{J_{ab}}{J_{aa}},

the share of the decisions that chose ``a`` which chose ``b`` too; its diagonal is 1, and a row of a
unit never chosen is undefined (``None``). With top-``k`` routing each row of the routed units sums
to ``k`` (``a`` itself included), so ``1 / (units - 1)`` off the diagonal, times ``k - 1``, is what
independent uniform routing would give.
"""

from __future__ import annotations

from typing import List, Optional

import torch


def selection_counts(selected: torch.Tensor) -> torch.Tensor:
    """``selected [decisions, units]`` bool -> ``J [units, units]`` float64 joint counts."""
    chosen = selected.double()
    return chosen.t() @ chosen


def expert_selection(expert_indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """``expert_indices [..., k]`` routed ids -> ``[decisions, n_experts]`` bool, one row per sub-token."""
    indices = expert_indices.reshape(-1, expert_indices.shape[-1]).long()
    chosen = torch.zeros(indices.shape[0], n_experts, dtype=torch.bool, device=indices.device)
    return chosen.scatter_(1, indices, True)


def conditional_coactivation(joint: torch.Tensor) -> List[List[Optional[float]]]:
    """``J [units, units]`` joint counts -> ``P(b | a)`` as nested lists (row ``a``, column ``b``);
    ``None`` in the rows of units never chosen."""
    if joint.dim() != 2 or joint.shape[0] != joint.shape[1]:
        raise ValueError(f"joint counts must be a square [units, units] matrix, got {list(joint.shape)}")
    joint = joint.double()  # shares in float64 whatever the counts were kept in
    chosen = joint.diagonal()
    rows = []
    for a in range(joint.shape[0]):
        if chosen[a] <= 0:
            rows.append([None] * joint.shape[1])
        else:
            rows.append([float(v) for v in (joint[a] / chosen[a]).tolist()])
    return rows
