"""Routing losses and auxiliary-loss-free balancing, shared by head and expert routers.

Convention (docs/routing.md): the load-balance loss equals exactly 1 at perfectly uniform routing,
for any number of nodes ``E`` and any ``k``, so its coefficient means the same in every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import nn

from ..config import GoHConfig
from ..layers.mosa import MOSA_AUX

# the names routed layers report their losses under (LayerRouting.aux_losses)
HEAD_BALANCE, HEAD_Z = "head_balance", "head_z"
EXPERT_BALANCE, EXPERT_Z = "expert_balance", "expert_z"
RECURSION_BALANCE, RECURSION_AUX = "recursion_balance", "recursion_aux_bce"


def loss_coefficients(cfg: GoHConfig) -> Dict[str, float]:
    """The weight of every routing loss in the model's ``aux_loss``, by loss name."""
    return {HEAD_BALANCE: cfg.balance_loss_coef, HEAD_Z: cfg.z_loss_coef,
            EXPERT_BALANCE: cfg.balance_loss_coef, EXPERT_Z: cfg.z_loss_coef,
            RECURSION_BALANCE: cfg.balance_loss_coef, RECURSION_AUX: cfg.recursion_aux_loss_coef,
            MOSA_AUX: cfg.mosa_aux_loss_coef}


def load_balance_loss(router_probs: torch.Tensor, selected: torch.Tensor, n_nodes: int,
                      valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Switch-style balance loss :math:`L_b = E \sum_i f_i P_i`.

    Args:
        router_probs: ``[tokens, E]`` softmax over all ``E`` routed nodes (heads or experts).
        selected: ``[tokens, k]`` ids of the nodes each token selected.
        n_nodes: ``E``.
        valid: ``[tokens]`` bool, ``False`` for padding, which then counts nowhere (``None``: all
            rows count); the loss equals that of the valid rows alone.

    :math:`f_i` is the fraction of the ``tokens * k`` selections that went to node ``i`` and
    :math:`P_i` the mean router probability of node ``i``; both sum to 1, so uniform routing gives
    ``E * E * (1/E) * (1/E) = 1``. Only ``P`` carries gradient (``f`` is a hard count).
    MoH's ``l_aux`` and Hugging Face's ``load_balancing_loss_func`` are ``k`` times this.
    """
    return BalanceTally.of(router_probs, selected, n_nodes, valid).loss()


@dataclass
class BalanceTally:
    """The parts of a balance loss, kept so that several layers can be pooled before the product.

    ``counts [E]``: selections per node (hard counts); ``prob_sum [E]``: summed router
    probabilities (with gradient); ``rows``: how many rows (sub-tokens) were routed (a 0-dim
    tensor when a token mask decided it); ``top_k``.
    """

    counts: torch.Tensor
    prob_sum: torch.Tensor
    rows: Union[int, torch.Tensor]
    top_k: int

    @classmethod
    def of(cls, router_probs: torch.Tensor, selected: torch.Tensor, n_nodes: int,
           valid: Optional[torch.Tensor] = None) -> "BalanceTally":
        """The tally of ``router_probs [rows, E]`` and ``selected [rows, k]``; rows where ``valid
        [rows]`` is ``False`` (padding) add nothing (their values are never read, so a padded row
        that is not finite changes nothing either)."""
        # a scatter-add, not bincount: its output size is known without reading the ids, so
        # torch.compile traces it without a graph break
        flat = selected.reshape(-1)
        if valid is None:
            counts = router_probs.new_zeros(n_nodes).scatter_add_(0, flat, router_probs.new_ones(flat.shape))
            return cls(counts, router_probs.sum(dim=0), router_probs.shape[0], selected.shape[-1])
        weight = valid.to(router_probs.dtype)
        counts = router_probs.new_zeros(n_nodes).scatter_add_(
            0, flat, weight.unsqueeze(-1).expand(selected.shape).reshape(-1))
        prob_sum = torch.where(valid.unsqueeze(-1), router_probs, 0.0).sum(dim=0)
        return cls(counts, prob_sum, weight.sum(), selected.shape[-1])

    def loss(self) -> torch.Tensor:
        r""":math:`E \sum_i f_i P_i` of these rows (1 at uniform load)."""
        return pooled_balance_loss([self])


def pooled_balance_loss(tallies: List[BalanceTally]) -> torch.Tensor:
    r"""The balance loss of all ``tallies`` together: counts and probabilities are summed over the
    layers first, then multiplied (Hugging Face's ``load_balancing_loss_func``, which is ``k``
    times this), instead of summing each layer's own product."""
    counts = sum(t.counts for t in tallies)
    prob_sum = sum(t.prob_sum for t in tallies)
    rows = sum(t.rows for t in tallies)
    if isinstance(rows, torch.Tensor):  # counted under a token mask: an all-padding batch gives 0, not NaN
        rows = rows.clamp(min=1)
    n_nodes, top_k = counts.shape[0], tallies[0].top_k
    return n_nodes * (counts / (rows * top_k) * (prob_sum / rows)).sum()


def global_balance_loss(tallies: List[BalanceTally], all_reduce: Optional[Callable[[torch.Tensor], None]] = None,
                        world_size: int = 1) -> torch.Tensor:
    r"""One layer's balance loss over a global batch (Qwen's global-batch balance), this rank's share.

    ``tallies``: the layer's tallies of every micro-batch of an optimizer step on this rank;
    ``all_reduce`` sums a tensor in place over the ``world_size`` data-parallel ranks (``None``:
    one process). The hard counts and row counts are summed over micro-batches and ranks; the
    probability sums only over this rank's micro-batches, since each rank differentiates its own:

    .. math:: L_r = W \cdot E \sum_i \frac{C_i}{N k} \frac{S^{(r)}_i}{N}

    with ``C`` and ``N`` the global counts and rows, ``S^{(r)}`` this rank's probability sum and
    ``W`` the world size. The mean of :math:`L_r` over ranks (what data parallelism averages, for
    the value and the gradient) is :math:`E \sum_i f_i P_i` of the one big batch, exactly: only
    ``P`` carries gradient, and it is linear in the per-rank sums.
    """
    pooled = BalanceTally(counts=sum(t.counts for t in tallies).detach(),
                          prob_sum=sum(t.prob_sum for t in tallies), top_k=tallies[0].top_k,
                          rows=sum(torch.as_tensor(t.rows, dtype=t.counts.dtype, device=t.counts.device)
                                   for t in tallies))
    counts_rows = torch.cat([pooled.counts, pooled.rows.detach().reshape(1).to(pooled.counts.dtype)])
    if all_reduce is not None and world_size > 1:
        all_reduce(counts_rows)
    counts, rows = counts_rows[:-1], counts_rows[-1].clamp(min=1)
    n_nodes = counts.shape[0]
    return world_size * n_nodes * (counts / (rows * pooled.top_k) * (pooled.prob_sum / rows)).sum()


def skips_training_losses() -> bool:
    """Whether routers may skip their losses: under ``torch.inference_mode`` nothing can train on
    them. Read as False while ``torch.compile`` traces (it cannot trace the inference-mode query,
    and a compiled training step needs the losses)."""
    return not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()


def router_z_loss(logits: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss ``mean(logsumexp(logits)^2)``; ``(ln E)^2`` for all-zero logits.

    Args:
        logits: ``[tokens, E]``.
        valid: ``[tokens]`` bool; the mean is then over the valid rows only (0 when there are
            none), i.e. padding adds no term.
    """
    squared = torch.logsumexp(logits.float(), dim=-1).square()
    if valid is None:
        return squared.mean()
    return torch.where(valid, squared, 0.0).sum() / valid.sum().clamp(min=1)


@torch.no_grad()
def update_balancing_bias(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3): ``bias += rate * sign(mean_load - load)``.

    Call after the optimizer step, never inside ``forward`` (a bias that changes between a forward
    pass and its recompute would route differently). ``load``: ``[E]`` selection counts since the
    previous update.
    """
    if load.sum() == 0:
        return
    bias += rate * torch.sign(load.mean() - load)


class BalancedRouting(nn.Module):
    """A gate that counts its selections and balances them after the optimizer step.

    Subclasses (:class:`~gohgraph.routers.heads.HeadGate`, :class:`~gohgraph.routers.experts.ExpertGate`)
    register a ``load_since_update [nodes]`` buffer, counted in training forwards, and fold it into
    their selection bias in :meth:`update_bias`. The model and the data-parallel wrapper find them
    by this type: the model calls :meth:`update_bias` after ``optimizer.step()``, and data
    parallelism sums ``load_since_update`` over ranks first, so every rank updates the same way.
    """

    load_since_update: torch.Tensor
    decoding = False  # set by GoHTransformer.generate for its duration

    def update_bias(self) -> None:
        raise NotImplementedError

    def count_load(self, selected: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        """Add the selections ``selected [rows, k]`` to ``load_since_update``; rows where ``valid
        [rows]`` is ``False`` (padding) add nothing, so they move no bias and no running load."""
        ids = selected.reshape(-1)  # index_add_, not bincount: no graph break under torch.compile
        if valid is None:
            ones = self.load_since_update.new_ones(ids.shape)
        else:
            ones = valid.to(self.load_since_update.dtype).unsqueeze(-1).expand(selected.shape).reshape(-1)
        self.load_since_update.index_add_(0, ids, ones)

    def set_decoding(self, decoding: bool) -> None:
        """Enter (or leave) decoding, where the routing losses are not computed."""
        self.decoding = decoding

