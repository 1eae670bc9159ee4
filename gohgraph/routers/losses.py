"""Routing losses and auxiliary-loss-free balancing, shared by head and expert routers.

Convention (DESIGN.md §10): the load-balance loss equals exactly 1 at perfectly uniform routing,
for any number of nodes ``E`` and any ``k``, so its coefficient means the same in every layer.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..config import GoHConfig

# the names routed layers report their losses under (LayerRouting.aux_losses)
HEAD_BALANCE, HEAD_Z = "head_balance", "head_z"
EXPERT_BALANCE, EXPERT_Z = "expert_balance", "expert_z"


def loss_coefficients(cfg: GoHConfig) -> Dict[str, float]:
    """The weight of every routing loss in the model's ``aux_loss``, by loss name."""
    return {HEAD_BALANCE: cfg.balance_loss_coef, HEAD_Z: cfg.z_loss_coef,
            EXPERT_BALANCE: cfg.balance_loss_coef, EXPERT_Z: cfg.z_loss_coef}


def load_balance_loss(router_probs: torch.Tensor, selected: torch.Tensor, n_nodes: int) -> torch.Tensor:
    r"""Switch-style balance loss :math:`L_b = E \sum_i f_i P_i`.

    Args:
        router_probs: ``[tokens, E]`` softmax over all ``E`` routed nodes (heads or experts).
        selected: ``[tokens, k]`` ids of the nodes each token selected.
        n_nodes: ``E``.

    :math:`f_i` is the fraction of the ``tokens * k`` selections that went to node ``i`` and
    :math:`P_i` the mean router probability of node ``i``; both sum to 1, so uniform routing gives
    ``E * E * (1/E) * (1/E) = 1``. Only ``P`` carries gradient (``f`` is a hard count).
    """
    counts = torch.bincount(selected.reshape(-1), minlength=n_nodes).to(router_probs.dtype)
    fraction_selected = counts / selected.numel()
    mean_prob = router_probs.mean(dim=0)
    return n_nodes * (fraction_selected * mean_prob).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean(logsumexp(logits)^2)``; ``(ln E)^2`` for all-zero logits.

    Args:
        logits: ``[tokens, E]``.
    """
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


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

    def update_bias(self) -> None:
        raise NotImplementedError

