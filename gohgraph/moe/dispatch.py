"""How sub-tokens reach their experts: sort by expert, apply capacity, gather, and combine back.

Dispatch sits between the router (*who goes where*, :mod:`gohgraph.routers.experts`) and the
experts (*what they do there*, :mod:`gohgraph.moe.experts`), as in MegaBlocks:

1. :func:`plan_dispatch` turns ``expert_ids [subtokens, k]`` into a :class:`DispatchPlan`: one
   stable sort of the ``subtokens * k`` assignments by expert, per-expert counts, and the capacity
   cut;
2. :func:`dispatch` gathers the sub-token rows into expert-contiguous groups
   (``(tokens, expert_ids) -> grouped``); an all-to-all for expert parallelism goes right here;
3. the experts run one grouped matmul over the groups;
4. :func:`combine` weights every expert output by its gate and adds it back to its sub-token row.

The expert layer talks to dispatch only through a :class:`Dispatcher` (``dispatch`` then
``combine``); :class:`LocalDispatcher` is the single-process one above, and an expert-parallel
dispatcher (tokens exchanged with ``all_to_all_single`` between steps 2 and 3, and back before 4)
replaces it without touching the layer.

Capacity (docs/experts.md): ``capacity = ceil(C * subtokens * k / E)`` assignments per expert.
**Priority** among the assignments competing for an expert is their flat order in
``expert_ids [subtokens, k]``: by sub-token position (batch, then sequence, then sub-token slot),
then by choice rank. An earlier position therefore never loses its place to a later one, so in a
causal LM a token's drops depend only on tokens before it in the batch order. Overflowing
assignments are dropped (the block's residual carries the sub-token), never recomputed elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol, Tuple

import torch


@dataclass
class DispatchPlan:
    """Where every kept (sub-token, expert) assignment goes, in expert-sorted order.

    Attributes:
        token_index: ``[kept]`` sub-token row each grouped row is copied from.
        assignment_index: ``[kept]`` flat assignment id (``subtoken * k + rank``) of each grouped row.
        group_sizes: ``[E]`` kept rows per expert (after capacity).
        group_offsets: ``[E]`` int32 cumulative ``group_sizes`` (``grouped_mm``'s ``offs``).
        expert_load: ``[E]`` assignments each expert was *asked* for (before capacity; hard counts).
        assignment_dropped: ``[subtokens, k]`` bool, ``True`` where the assignment overflowed.
        capacity: per-expert limit, or ``None`` when dropless.
    """

    token_index: torch.Tensor
    assignment_index: torch.Tensor
    group_sizes: torch.Tensor
    group_offsets: torch.Tensor
    expert_load: torch.Tensor
    assignment_dropped: torch.Tensor
    capacity: Optional[int]

    @property
    def subtoken_dropped(self) -> torch.Tensor:
        """``[subtokens]`` bool: the sub-token lost every one of its routed assignments."""
        return self.assignment_dropped.all(dim=-1)


def expert_capacity(capacity_factor: Optional[float], n_subtokens: int, top_k: int, n_experts: int) -> Optional[int]:
    """``ceil(C * n_subtokens * k / E)``, or ``None`` (dropless) when ``capacity_factor`` is ``None``."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * n_subtokens * top_k / n_experts)


def plan_dispatch(expert_ids: torch.Tensor, n_experts: int, capacity: Optional[int] = None,
                  slots_taken: Optional[torch.Tensor] = None) -> DispatchPlan:
    """Sort the assignments ``expert_ids [subtokens, k]`` by expert and cut each group at ``capacity``.

    The sort is stable, so inside each expert's group the assignments keep their flat order, which
    is exactly the capacity priority (position, then rank) described in the module docstring.
    ``slots_taken [E]`` are capacity slots already used by assignments that come *before* these
    ones in the priority order (expert parallelism: those of lower ranks), so expert ``e`` keeps
    only ``capacity - slots_taken[e]`` of them.
    """
    top_k = expert_ids.shape[-1]
    flat_experts = expert_ids.reshape(-1)
    sorted_experts, order = torch.sort(flat_experts, stable=True)
    expert_load = torch.bincount(flat_experts, minlength=n_experts)
    if capacity is None:
        kept_order, group_sizes = order, expert_load
        assignment_dropped = torch.zeros_like(expert_ids, dtype=torch.bool)
    else:
        group_starts = torch.cumsum(expert_load, dim=0) - expert_load
        rank_in_group = torch.arange(order.numel(), device=order.device) - group_starts[sorted_experts]
        free = torch.full_like(expert_load, capacity)
        if slots_taken is not None:
            free = (free - slots_taken).clamp(min=0)
        keep_sorted = rank_in_group < free[sorted_experts]
        kept_order = order[keep_sorted]
        group_sizes = torch.minimum(expert_load, free)
        assignment_dropped = torch.ones(flat_experts.numel(), dtype=torch.bool, device=order.device)
        assignment_dropped[kept_order] = False
        assignment_dropped = assignment_dropped.view_as(expert_ids)
    return DispatchPlan(
        token_index=torch.div(kept_order, top_k, rounding_mode="floor"),
        assignment_index=kept_order,
        group_sizes=group_sizes,
        group_offsets=torch.cumsum(group_sizes, dim=0).to(torch.int32),
        expert_load=expert_load,
        assignment_dropped=assignment_dropped,
        capacity=capacity,
    )


def dispatch(tokens: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``tokens [subtokens, d]`` -> ``grouped [kept, d]``, rows contiguous per expert."""
    return tokens.index_select(0, plan.token_index)


def combine(expert_out: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor, n_subtokens: int) -> torch.Tensor:
    """Gate-weight the expert outputs and add them back to their sub-tokens.

    Args:
        expert_out: ``[kept, d]`` in the plan's grouped order.
        weights: ``[subtokens, k]`` gate of every assignment. A dropped assignment's weight is
            lost, not handed to the sub-token's other experts (as in Switch / GShard).
    Returns:
        ``[subtokens, d]``; a sub-token whose assignments were all dropped gets exactly 0.
    """
    gate = weights.reshape(-1).index_select(0, plan.assignment_index).to(expert_out.dtype)
    out = expert_out.new_zeros(n_subtokens, expert_out.shape[-1])
    return out.index_add_(0, plan.token_index, expert_out * gate.unsqueeze(-1))


class Dispatcher(Protocol):
    """The ``(tokens, expert ids) -> grouped rows`` boundary and its way back.

    ``dispatch(tokens [subtokens, d], expert_ids [subtokens, k], capacity_factor)`` returns the rows
    the local experts compute, ``grouped [rows, d]`` contiguous per local expert, their
    ``group_offsets [local experts]`` (int32, cumulative) and the :class:`DispatchPlan` (drops and
    loads are global counts). The dispatcher turns ``capacity_factor`` (``None``: dropless) into a
    capacity with :func:`expert_capacity` over *every* sub-token it dispatches, its group's included.
    ``combine(expert_out [rows, d], plan, weights [subtokens, k])`` returns ``[subtokens, d]``, the
    gate-weighted sum of every sub-token's expert outputs.
    """

    def dispatch(self, tokens: torch.Tensor, expert_ids: torch.Tensor, capacity_factor: Optional[float]
                 ) -> Tuple[torch.Tensor, torch.Tensor, DispatchPlan]: ...

    def combine(self, expert_out: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor) -> torch.Tensor: ...


class LocalDispatcher:
    """Every routed expert lives in this process: sort, gather, and scatter-add back."""

    def __init__(self, n_experts: int) -> None:
        self.n_experts = n_experts

    def dispatch(self, tokens: torch.Tensor, expert_ids: torch.Tensor, capacity_factor: Optional[float]
                 ) -> Tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
        n_subtokens, top_k = expert_ids.shape
        capacity = expert_capacity(capacity_factor, n_subtokens, top_k, self.n_experts)
        plan = plan_dispatch(expert_ids, self.n_experts, capacity)
        return dispatch(tokens, plan), plan.group_offsets, plan

    def combine(self, expert_out: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor) -> torch.Tensor:
        return combine(expert_out, plan, weights, weights.shape[0])

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(experts={self.n_experts})"

