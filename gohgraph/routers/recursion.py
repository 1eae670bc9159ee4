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

The scores :math:`s_r = \theta_r^\top h` and the depth logits :math:`W h` are linear in the token by
default (``cfg.recursion_scorer="linear"``). With ``"graph"`` a :class:`GraphRecursionScorer` computes
them instead: the token's heads are the nodes of the head graph and the GoH head router's message
passing (:class:`~gohgraph.routers.heads.HeadRouter`) runs over them, so a GoH model can route its
recursions by the same graph that routes its heads. The auxiliary routers stay linear.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GoHConfig
from ..graph import head_graph
from .heads import HeadRouter
from .losses import RECURSION_AUX, RECURSION_BALANCE, load_balance_loss, skips_training_losses


def expert_choice_capacity(recursion: int, max_recursions: int, seq_len: int, warmup: float = 0.0) -> int:
    r"""Tokens per sequence that recursion ``r`` keeps: :math:`\lceil (\beta_r + (1 - \beta_r) w) T \rceil`
    with :math:`\beta_r = (N_r - r) / N_r` and warm-up share :math:`w` (0 after the warm-up)."""
    return math.ceil(kept_share(recursion, max_recursions, warmup) * seq_len)


def kept_share(recursion: int, max_recursions: int, warmup: float = 0.0) -> float:
    r""":math:`\beta_r + (1 - \beta_r) w`, the share of a sequence's tokens recursion ``r`` keeps."""
    share = (max_recursions - recursion) / max_recursions
    return share + (1.0 - share) * warmup


class ExpertChoiceRecursionRouter(nn.Module):
    r"""Expert-choice recursion router (module docstring); one score and one auxiliary router per
    routed recursion ``1 .. N_r - 1``.

    ``graph_scorer``: a :class:`GraphRecursionScorer` with ``N_r - 1`` outputs whose output
    ``r - 1`` is :math:`s_r`, in place of the linear scores (``self.scores`` is then empty).

    Shapes: ``h [batch, seq, d_model]``, ``previous [batch, seq]`` bool (who took ``r - 1``),
    ``valid [batch, seq]`` bool or ``None`` (``False``: padding; a row's capacity is then
    :math:`\lceil \beta_r T_b \rceil` of its ``T_b`` real tokens) ->
    ``(selected [batch, seq] bool, gate [batch, seq] float32, losses)``. Padding must not be in
    ``previous``; it is then never selected and adds no loss term.
    """

    def __init__(self, d_model: int, max_recursions: int, gate_scale: float, init_std: float = 0.02,
                 aux_router: bool = True, graph_scorer: Optional[GraphRecursionScorer] = None) -> None:
        super().__init__()
        self.max_recursions, self.gate_scale = max_recursions, gate_scale
        self.capacity_warmup = 0.0  # a plain float: the top-k size must be known without a device sync
        if graph_scorer is not None and graph_scorer.n_outputs != max_recursions - 1:
            raise ValueError(f"graph_scorer has {graph_scorer.n_outputs} outputs; expert-choice needs "
                             f"max_recursions - 1 = {max_recursions - 1}")
        self.graph_scorer = graph_scorer
        self.scores = nn.ModuleList(nn.Linear(d_model, 1, bias=False)
                                    for _ in range(max_recursions - 1 if graph_scorer is None else 0))
        self.aux_routers = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(max_recursions - 1) if aux_router)
        for linear in [*self.scores, *self.aux_routers]:
            nn.init.normal_(linear.weight, std=init_std)
        for linear in self.aux_routers:
            nn.init.zeros_(linear.bias)

    def forward(self, h: torch.Tensor, recursion: int, previous: torch.Tensor, valid: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        with torch.autocast(device_type=h.device.type, enabled=False):
            scores = self.score(h, recursion)  # [batch, seq]
            gate = self.gate_scale * torch.sigmoid(scores)
            if not self.training:
                decisive = _float_linear(self.aux_routers[recursion - 1], h).squeeze(-1) if self.aux_routers else scores
                return previous & (decisive > 0), gate, {}
            selected = self.top_tokens(scores, recursion, previous, valid)
            if self.aux_routers:
                # the auxiliary router learns to predict the choice from the token alone (detached:
                # it must not shape the hidden states it reads)
                predicted = _float_linear(self.aux_routers[recursion - 1], h.detach()).squeeze(-1)
            else:  # the router's own scores learn to be above 0 exactly for the tokens it keeps
                predicted = scores
            bce = F.binary_cross_entropy_with_logits(predicted[previous], selected[previous].float())
        return selected, gate, {RECURSION_AUX: bce}

    def score(self, h: torch.Tensor, recursion: int) -> torch.Tensor:
        """:math:`s_r` of every token, ``[batch, seq]`` float32."""
        if self.graph_scorer is not None:
            return self.graph_scorer(h)[..., recursion - 1]
        return _float_linear(self.scores[recursion - 1], h).squeeze(-1)

    def top_tokens(self, scores: torch.Tensor, recursion: int, previous: torch.Tensor,
                   valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[batch, seq]`` bool: per sequence the top ``capacity`` scores among ``previous``; with
        ``valid``, each row's capacity counts its real tokens only."""
        ranked = scores.detach().masked_fill(~previous, float("-inf"))
        if valid is None:
            capacity = expert_choice_capacity(recursion, self.max_recursions, scores.shape[1], self.capacity_warmup)
            top = ranked.topk(capacity, dim=-1).indices
            return torch.zeros_like(previous).scatter(-1, top, True) & previous
        # float64, as expert_choice_capacity's Python arithmetic, so a row equals itself unpadded
        share = kept_share(recursion, self.max_recursions, self.capacity_warmup)
        capacity = torch.ceil(share * valid.sum(-1, dtype=torch.float64)).long()  # [batch]
        order = ranked.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                                .expand_as(order))
        return (rank < capacity[:, None]) & previous


class TokenChoiceRecursionRouter(nn.Module):
    """Token-choice recursion router (module docstring).

    ``graph_scorer``: a :class:`GraphRecursionScorer` with ``N_r`` outputs, the depth logits in
    place of :math:`W h` (``self.proj`` is then ``None``).

    Shapes: ``h [batch, seq, d_model]``, ``valid [batch, seq]`` bool or ``None`` (``False``:
    padding, which adds nothing to the balance loss) -> ``(depth [batch, seq] long in 1..N_r,
    gate [batch, seq] float32, losses)``.
    """

    def __init__(self, d_model: int, max_recursions: int, init_std: float = 0.02,
                 graph_scorer: Optional[GraphRecursionScorer] = None) -> None:
        super().__init__()
        self.max_recursions = max_recursions
        if graph_scorer is not None and graph_scorer.n_outputs != max_recursions:
            raise ValueError(f"graph_scorer has {graph_scorer.n_outputs} outputs; token-choice needs "
                             f"max_recursions = {max_recursions}")
        self.graph_scorer = graph_scorer
        self.proj: Optional[nn.Linear] = None
        if graph_scorer is None:
            self.proj = nn.Linear(d_model, max_recursions, bias=False)
            nn.init.normal_(self.proj.weight, std=init_std)

    def forward(self, h: torch.Tensor, valid: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        with torch.autocast(device_type=h.device.type, enabled=False):
            logits = self.graph_scorer(h) if self.graph_scorer is not None else _float_linear(self.proj, h)
            probs = torch.softmax(logits, dim=-1)  # [batch, seq, N_r]
        choice = probs.argmax(dim=-1)
        gate = probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        losses = {}
        if not skips_training_losses():
            losses[RECURSION_BALANCE] = load_balance_loss(probs.reshape(-1, self.max_recursions),
                                                          choice.reshape(-1, 1), self.max_recursions,
                                                          None if valid is None else valid.reshape(-1))
        return choice + 1, gate, losses


class GraphRecursionScorer(nn.Module):
    r"""Recursion scores from message passing over the token's heads (GoH as the recursion router).

    The token's hidden state, RMS-normalised without a weight (:math:`\hat h = h / \mathrm{rms}(h)`:
    the residual stream's scale varies by layer and training step, and a nonlinear scorer should see
    features of size 1), is split into one node per head, :math:`x_i = \hat h[i d_h : (i + 1) d_h]`
    (``d_h = d_model / H``), and the GoH head router's rounds run over the head graph
    (:class:`~gohgraph.routers.heads.HeadRouter`, the same module and both of its paths):
    :math:`z^0_i = W_z x_i + e_i`, ``R`` GAT rounds, node logits :math:`s_{io} = u_o^\top z^R_i + b_{io}`
    for every output ``o``. The readout is the mean over the nodes:

    .. math::
        s_o = \frac{1}{H} \sum_{i=1}^{H} s_{io}

    one scalar per token per output: per routed recursion for expert-choice, per depth for
    token-choice. The scores are computed from each token alone, so routing by them stays causal.
    Runs in float32 when the weights are float32, whatever the autocast dtype (docs/routing.md).

    Args:
        d_model: token width (a multiple of ``n_heads``).
        n_heads: nodes per token.
        edge_index: ``[2, E]`` head graph without self-loops.
        router_dim, rounds: node feature width ``F`` and rounds ``R >= 1``.
        n_outputs: scores per token.
        eps: added to the mean square before the root.
    Shapes: ``h [batch, seq, d_model]`` -> scores ``[batch, seq, n_outputs]`` float32.
    """

    def __init__(self, d_model: int, n_heads: int, edge_index: torch.Tensor, router_dim: int, rounds: int,
                 n_outputs: int, init_std: float = 0.02, eps: float = 1e-6) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads, self.n_outputs, self.eps = n_heads, n_outputs, eps
        self.graph = HeadRouter(d_model // n_heads, n_heads, edge_index, router_dim, rounds, init_std,
                                n_outputs=n_outputs)

    @classmethod
    def from_config(cls, cfg: GoHConfig, n_outputs: int) -> "GraphRecursionScorer":
        """The scorer over ``cfg.head_graph`` with the head router's ``router_dim`` and ``router_rounds``."""
        return cls(cfg.d_model, cfg.n_heads, head_graph(cfg.head_graph, cfg.n_heads), cfg.router_dim,
                   cfg.router_rounds, n_outputs, cfg.init_std, cfg.norm_eps)

    def forward(self, h: torch.Tensor, fused: Optional[bool] = None) -> torch.Tensor:
        """``fused=None`` takes the head router's default path for this graph."""
        batch, seq, d_model = h.shape
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = h.to(self.graph.score.weight.dtype)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            nodes = h.reshape(batch * seq, self.n_heads, d_model // self.n_heads)
            logits, _ = self.graph.node_logits(nodes, fused)
        return logits.float().view(batch * seq, self.n_heads, self.n_outputs).mean(1).view(batch, seq, -1)


def _float_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` in float32 whatever the dtype of the model (routing runs in float32)."""
    bias = None if linear.bias is None else linear.bias.float()
    return F.linear(x.float(), linear.weight.float(), bias)
