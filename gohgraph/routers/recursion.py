r"""Recursion routers of Mixture-of-Recursions (Bae et al. 2025): which tokens take which recursion.

Recursions are numbered ``r = 0 .. N_r - 1``. Every token takes recursion 0; these routers decide
who continues into ``r >= 1``, and with what gate ``g`` the update ``h <- h + g (f(h) - h)`` is
applied (:mod:`gohgraph.models.recursion`).

* :class:`ExpertChoiceRecursionRouter` - recursion ``r`` keeps, per sequence, the top
  :math:`\lceil \beta_r T \rceil` tokens by score :math:`s_r = \theta_r^\top h` among those that
  took ``r - 1`` (nested subsets), :math:`\beta_r = (N_r - r) / N_r` (1, 2/3, 1/3 for
  :math:`N_r = 3`), or :math:`\beta_r + (1 - \beta_r) w` during a capacity warm-up of share
  :math:`w` (1 keeps every token; :attr:`ExpertChoiceRecursionRouter.capacity_warmup`, set from
  outside before each step, never inside ``forward``); gate :math:`g = \alpha\,\sigma(s_r)`. That choice looks at the whole sequence,
  so it is only used in training. At evaluation a per-token rule decides causally
  (``cfg.recursion_inference``, the reference code's two ``sampling`` options): ``"aux-router"``, an
  auxiliary router :math:`a_r^\top h` fed a detached :math:`h` and trained with a BCE loss to
  predict the top-k choice, continues a token when :math:`a_r^\top h > 0`; ``"router-bce"`` puts
  the BCE loss on :math:`s_r` itself and continues a token when :math:`\sigma(s_r) > 1/2`.
* :class:`TokenChoiceRecursionRouter` - each token picks its depth once, up front:
  :math:`p = \mathrm{softmax}(W h)` over ``N_r`` depths, depth :math:`= 1 + \arg\max p`, gate
  :math:`g = p_{depth}` on every routed recursion it takes; balance loss
  :math:`N_r \sum_i f_i P_i` (1 at uniform, :func:`~gohgraph.routers.losses.load_balance_loss`).
  Causal by construction.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .losses import RECURSION_AUX, RECURSION_BALANCE, load_balance_loss


def expert_choice_capacity(recursion: int, max_recursions: int, seq_len: int, warmup: float = 0.0) -> int:
    r"""Tokens per sequence that recursion ``r`` keeps: :math:`\lceil (\beta_r + (1 - \beta_r) w) T \rceil`
    with :math:`\beta_r = (N_r - r) / N_r` and warm-up share :math:`w` (0 after the warm-up)."""
    share = (max_recursions - recursion) / max_recursions
    return math.ceil((share + (1.0 - share) * warmup) * seq_len)


class ExpertChoiceRecursionRouter(nn.Module):
    """Expert-choice recursion router (module docstring); one score and one auxiliary router per
    routed recursion ``1 .. N_r - 1``.

    Shapes: ``h [batch, seq, d_model]``, ``previous [batch, seq]`` bool (who took ``r - 1``) ->
    ``(selected [batch, seq] bool, gate [batch, seq] float32, losses)``.
    """

    def __init__(self, d_model: int, max_recursions: int, gate_scale: float, init_std: float = 0.02,
                 aux_router: bool = True) -> None:
        super().__init__()
        self.max_recursions, self.gate_scale = max_recursions, gate_scale
        self.capacity_warmup = 0.0  # a plain float: the top-k size must be known without a device sync
        self.scores = nn.ModuleList(nn.Linear(d_model, 1, bias=False) for _ in range(max_recursions - 1))
        self.aux_routers = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(max_recursions - 1) if aux_router)
        for linear in [*self.scores, *self.aux_routers]:
            nn.init.normal_(linear.weight, std=init_std)
        for linear in self.aux_routers:
            nn.init.zeros_(linear.bias)

    def forward(self, h: torch.Tensor, recursion: int, previous: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        with torch.autocast(device_type=h.device.type, enabled=False):
            scores = _float_linear(self.scores[recursion - 1], h).squeeze(-1)  # [batch, seq]
            gate = self.gate_scale * torch.sigmoid(scores)
            if not self.training:
                decisive = _float_linear(self.aux_routers[recursion - 1], h).squeeze(-1) if self.aux_routers else scores
                return previous & (decisive > 0), gate, {}
            selected = self.top_tokens(scores, recursion, previous)
            if self.aux_routers:
                # the auxiliary router learns to predict the choice from the token alone (detached:
                # it must not shape the hidden states it reads)
                predicted = _float_linear(self.aux_routers[recursion - 1], h.detach()).squeeze(-1)
            else:  # the router's own scores learn to be above 0 exactly for the tokens it keeps
                predicted = scores
            bce = F.binary_cross_entropy_with_logits(predicted[previous], selected[previous].float())
        return selected, gate, {RECURSION_AUX: bce}

    def top_tokens(self, scores: torch.Tensor, recursion: int, previous: torch.Tensor) -> torch.Tensor:
        """``[batch, seq]`` bool: per sequence the top ``capacity`` scores among ``previous``."""
        capacity = expert_choice_capacity(recursion, self.max_recursions, scores.shape[1], self.capacity_warmup)
        ranked = scores.detach().masked_fill(~previous, float("-inf"))
        top = ranked.topk(capacity, dim=-1).indices
        return torch.zeros_like(previous).scatter(-1, top, True) & previous


class TokenChoiceRecursionRouter(nn.Module):
    """Token-choice recursion router (module docstring).

    Shapes: ``h [batch, seq, d_model]`` -> ``(depth [batch, seq] long in 1..N_r, gate [batch, seq]
    float32, losses)``.
    """

    def __init__(self, d_model: int, max_recursions: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.max_recursions = max_recursions
        self.proj = nn.Linear(d_model, max_recursions, bias=False)
        nn.init.normal_(self.proj.weight, std=init_std)

    def forward(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        with torch.autocast(device_type=h.device.type, enabled=False):
            probs = torch.softmax(_float_linear(self.proj, h), dim=-1)  # [batch, seq, N_r]
        choice = probs.argmax(dim=-1)
        gate = probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        losses = {}
        if not torch.is_inference_mode_enabled():
            losses[RECURSION_BALANCE] = load_balance_loss(probs.reshape(-1, self.max_recursions),
                                                          choice.reshape(-1, 1), self.max_recursions)
        return choice + 1, gate, losses


def _float_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` in float32 whatever the dtype of the model (routing runs in float32, DESIGN.md §10)."""
    bias = None if linear.bias is None else linear.bias.float()
    return F.linear(x.float(), linear.weight.float(), bias)
