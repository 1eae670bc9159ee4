"""Expert routers: which routed experts each sub-token goes to, and with what weight.

Two logit producers and one gate, used in this order by :class:`~gohgraph.moe.layer.MoEFeedForward`:

* :class:`LinearExpertRouter` (SMoE, MH-MoE) - logits from a linear map of the sub-token;
* :class:`GraphExpertRouter` (GoH-MoE) - message passing over the bipartite sub-token -> expert
  graph, whose expert nodes carry learned embeddings and, optionally, their running load;
* :class:`ExpertGate` - masks experts the graph forbids, picks the top-``k`` per sub-token,
  renormalises their weights, computes the routing losses and holds the auxiliary-loss-free bias.

Everything here runs in float32, whatever the autocast dtype: bf16 ties change the selected set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GoHConfig
from ..graph import bipartite_adjacency, with_self_loops
from .gat import GraphAttention
from .losses import EXPERT_BALANCE, EXPERT_Z, BalancedRouting, BalanceTally, router_z_loss, update_balancing_bias
from .noise import RouterNoise


class LinearExpertRouter(nn.Module):
    """Switch / MH-MoE router ``s = W_r x``, shared by every sub-token slot.

    Shapes: ``sub [tokens, subtokens, d_sub]`` -> logits ``[tokens, subtokens, experts]`` (float32).
    """

    def __init__(self, d_sub: int, n_experts: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.proj = nn.Linear(d_sub, n_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=init_std)

    def forward(self, sub: torch.Tensor, expert_load: Optional[torch.Tensor] = None,
                fused: bool = True) -> torch.Tensor:
        with torch.autocast(device_type=sub.device.type, enabled=False):
            return F.linear(sub.float(), self.proj.weight.float())


class BipartiteAttention(GraphAttention):
    r"""One direction of GAT-style message passing on a bipartite graph, for every token at once.

    Destination node :math:`i` gathers from its source neighbours :math:`j`:

    .. math::
        h_j = W x^{src}_j, \quad
        \alpha_{ji} = \mathrm{softmax}_{j \in \mathcal{N}(i)}
            \mathrm{LeakyReLU}(a_{src}^\top h_j + a_{dst}^\top x^{dst}_i), \quad
        x^{dst}_i \leftarrow x^{dst}_i + \mathrm{GELU}\Big(\sum_j \alpha_{ji} h_j + c\Big)

    The aggregation is :class:`~gohgraph.routers.gat.GraphAttention`'s: a destination without
    in-edges receives no message (its sum is 0); ``fused=True`` is the dense masked softmax and one
    batched matmul, ``fused=False`` PyG's ``propagate`` (the reference).

    Shapes: ``x_src [tokens, n_src, F]``, ``x_dst [tokens, n_dst, F]`` -> ``[tokens, n_dst, F]``;
    ``edge_index [2, E]`` with row 0 in ``0..n_src-1`` and row 1 in ``0..n_dst-1``.
    """

    def __init__(self, dim: int, edge_index: torch.Tensor, n_src: int, n_dst: int) -> None:
        super().__init__(edge_index, n_src, n_dst)
        self.dim = dim
        self.lin = nn.Linear(dim, dim, bias=False)
        self.att_src = nn.Parameter(torch.empty(dim))
        self.att_dst = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.lin.weight, std=1.0 / math.sqrt(self.dim))
        nn.init.normal_(self.att_src, std=1.0 / math.sqrt(self.dim))
        nn.init.normal_(self.att_dst, std=1.0 / math.sqrt(self.dim))
        nn.init.zeros_(self.bias)

    def forward(self, x_src: torch.Tensor, x_dst: torch.Tensor, fused: bool = True) -> torch.Tensor:
        h = self.lin(x_src)
        score_src = h @ self.att_src.unsqueeze(-1)  # [tokens, n_src, 1]
        score_dst = x_dst @ self.att_dst.unsqueeze(-1)  # [tokens, n_dst, 1]
        aggregated, _ = self.attend(h, score_src, score_dst, fused=fused)
        return x_dst + F.gelu(aggregated + self.bias)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(src={self.n_src}, dst={self.n_dst}, "
                f"edges={self.attention_edge_index.shape[1]}, feat={self.dim})")


class GraphExpertRouter(nn.Module):
    r"""GoH-MoE router: message passing over the bipartite sub-token -> expert graph, per token.

    Nodes of token ``t``: its ``m`` sub-tokens :math:`z_s = W_{in} x_s + p_s` (``p_s`` a learned
    slot embedding) and the ``E`` routed experts :math:`u_e = q_e + (\ell_e - 1)\, w_\ell`, with
    ``q_e`` a learned expert embedding and :math:`\ell_e` the expert's running load relative to
    the ideal (1 = uniform; the term is dropped when ``load_feature=False``), so the router can
    learn load-aware routing. Each of the ``R`` rounds lets the experts gather from the sub-tokens
    that reach them; then, given an expert <-> expert ``peer_edge_index`` (GMoE, Bai et al. 2024),
    the experts gather from their neighbours there and from themselves (a GAT round over the peer
    graph plus self-loops); then the sub-tokens gather from the experts. Each step is a
    :class:`BipartiteAttention`, over ``edge_index``, the peer graph and ``edge_index`` reversed. The logit of sub-token ``s`` for expert ``e``
    is :math:`(W_q z_s)^\top u_e / \sqrt{F} + b_e` on graph edges and :math:`-\infty` elsewhere.

    ``fused=True`` uses the dense paths (einsum logits, masked softmax); ``fused=False`` runs
    ``propagate`` and scores only the graph's edges: it is the reference the tests compare with.

    Shapes: ``sub [tokens, subtokens, d_sub]``, ``expert_load [experts]`` ->
    logits ``[tokens, subtokens, experts]`` (float32); ``peer_edge_index [2, E']`` over experts,
    without self-loops (``None`` or no edges: no expert <-> expert step).
    """

    def __init__(self, d_sub: int, n_subtokens: int, n_experts: int, edge_index: torch.Tensor,
                 router_dim: int, rounds: int, load_feature: bool, init_std: float = 0.02,
                 peer_edge_index: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.n_subtokens, self.n_experts, self.router_dim = n_subtokens, n_experts, router_dim
        self.load_feature, self.init_std = load_feature, init_std
        self.node_in = nn.Linear(d_sub, router_dim, bias=False)
        self.slot_embedding = nn.Parameter(torch.empty(n_subtokens, router_dim))
        self.expert_embedding = nn.Parameter(torch.empty(n_experts, router_dim))
        self.load_weight = nn.Parameter(torch.empty(router_dim)) if load_feature else None
        reverse = edge_index.flip(0)
        self.to_experts = nn.ModuleList(
            BipartiteAttention(router_dim, edge_index, n_subtokens, n_experts) for _ in range(rounds))
        self.to_subtokens = nn.ModuleList(
            BipartiteAttention(router_dim, reverse, n_experts, n_subtokens) for _ in range(rounds))
        self.n_peer_edges = 0 if peer_edge_index is None else peer_edge_index.shape[1]
        self.among_experts: Optional[nn.ModuleList] = None
        if self.n_peer_edges:
            peers = with_self_loops(peer_edge_index, n_experts)
            self.among_experts = nn.ModuleList(
                BipartiteAttention(router_dim, peers, n_experts, n_experts) for _ in range(rounds))
        self.query = nn.Linear(router_dim, router_dim, bias=False)
        self.expert_bias = nn.Parameter(torch.empty(n_experts))
        self.register_buffer("edge_index", edge_index.clone(), persistent=False)
        self.register_buffer("allowed", bipartite_adjacency(edge_index, n_subtokens, n_experts).t().contiguous(),
                             persistent=False)  # [subtokens, experts]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.node_in.weight, std=1.0 / math.sqrt(self.node_in.in_features))
        nn.init.normal_(self.slot_embedding, std=1.0)
        nn.init.normal_(self.expert_embedding, std=1.0)
        if self.load_weight is not None:
            nn.init.normal_(self.load_weight, std=1.0)
        # a small query: routing starts near uniform, as the linear router does
        nn.init.normal_(self.query.weight, std=self.init_std)
        nn.init.zeros_(self.expert_bias)
        for layer in [*self.to_experts, *self.to_subtokens, *(self.among_experts or [])]:
            layer.reset_parameters()

    def forward(self, sub: torch.Tensor, expert_load: Optional[torch.Tensor] = None,
                fused: bool = True) -> torch.Tensor:
        with torch.autocast(device_type=sub.device.type, enabled=False):
            # the router's own dtype: float32 under autocast, bf16 in a model cast to bf16
            dtype = self.node_in.weight.dtype
            n_tokens = sub.shape[0]
            z_sub = self.node_in(sub.to(dtype)) + self.slot_embedding
            z_exp = self.expert_embedding
            if self.load_weight is not None and expert_load is not None:
                z_exp = z_exp + (expert_load.to(dtype) - 1.0).unsqueeze(-1) * self.load_weight
            z_exp = z_exp.expand(n_tokens, -1, -1)
            for r, (to_experts, to_subtokens) in enumerate(zip(self.to_experts, self.to_subtokens)):
                z_exp = to_experts(z_sub, z_exp, fused=fused)
                if self.among_experts is not None:
                    z_exp = self.among_experts[r](z_exp, z_exp, fused=fused)
                z_sub = to_subtokens(z_exp, z_sub, fused=fused)
            query = self.query(z_sub) / math.sqrt(self.router_dim)
            if fused:
                logits = torch.matmul(query, z_exp.transpose(1, 2)) + self.expert_bias
                return logits.masked_fill(~self.allowed, float("-inf"))
            return self._edge_logits(query, z_exp)

    def _edge_logits(self, query: torch.Tensor, z_exp: torch.Tensor) -> torch.Tensor:
        # reference: score each graph edge on its own and leave every non-edge at -inf
        slot, expert = self.edge_index
        edge_logits = (query[:, slot] * z_exp[:, expert]).sum(-1) + self.expert_bias[expert]
        logits = query.new_full((query.shape[0], self.n_subtokens * self.n_experts), float("-inf"))
        logits = logits.index_copy(1, slot * self.n_experts + expert, edge_logits)
        return logits.view(-1, self.n_subtokens, self.n_experts)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(subtokens={self.n_subtokens}, experts={self.n_experts}, "
                f"edges={self.edge_index.shape[1]}, peer_edges={self.n_peer_edges}, feat={self.router_dim}, rounds={len(self.to_experts)}, "
                f"load_feature={self.load_feature})")


@dataclass
class ExpertChoice:
    """Output of :class:`ExpertGate` for ``tokens`` tokens of ``subtokens`` sub-tokens each.

    ``indices [tokens, subtokens, k]`` routed expert ids (best first); ``weights`` the same shape,
    float32, summing to 1 per sub-token; ``aux_losses`` ``expert_balance`` and ``expert_z`` (not
    computed when ``cfg.z_loss_coef`` is 0).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    aux_losses: Dict[str, torch.Tensor]
    balance: Optional[BalanceTally] = None  # the parts of expert_balance, for pooling across layers
    # [tokens, subtokens] k-th minus (k+1)-th selection score (nan where the (k+1)-th is forbidden),
    # detached; None while decoding or when top_k covers every expert
    margins: Optional[torch.Tensor] = None


SIGMOID_NORM_EPS = 1e-20  # DeepSeek-V3's guard on the sum of the selected scores


class ExpertGate(BalancedRouting):
    r"""Top-``k`` selection, weight renormalisation, routing losses and balancing state.

    With logits ``s [tokens, subtokens, E]``: experts the graph forbids are set to
    :math:`-\infty`. Then, by ``cfg.expert_score``:

    * ``"softmax"`` (Mixtral, Qwen2-MoE, MH-MoE): the top-``k`` of ``s + bias`` are selected (the
      auxiliary-loss-free bias only selects); their weights are :math:`\mathrm{softmax}` over the
      kept logits, i.e. the full softmax renormalised over the selection (Mixtral; with ``k = 1``
      the weight is exactly 1), or with ``expert_renormalise=False`` the full softmax's values
      (Qwen2-MoE's ``norm_topk_prob=False``).
    * ``"sigmoid"`` (DeepSeek-V3): scores :math:`\sigma(s)`; the top-``k`` of ``σ(s) + bias`` are
      selected (the bias sits on the scores, as DeepSeek-V3's ``e_score_correction_bias``); the
      weights are the selected scores, divided by their sum with ``expert_renormalise``.

    With ``n_expert_groups > 1`` selection is group-limited (DeepSeek-V3): each group's score is
    the sum of its two best choice scores, and only the best ``top_k_expert_groups`` groups may
    be chosen from. Weights are finally multiplied by ``routed_scaling_factor``. In training,
    ``cfg.expert_router_noise`` makes the selection stochastic (:mod:`~gohgraph.routers.noise`).

    Losses over the ``tokens * subtokens`` rows of real tokens (padding excluded by ``valid``):
    ``expert_balance`` = :func:`~gohgraph.routers.losses.load_balance_loss` (1 at uniform load) and
    ``expert_z`` = :func:`~gohgraph.routers.losses.router_z_loss` (only when ``cfg.z_loss_coef`` is
    not 0).

    Buffers: ``selection_bias [E]`` (persistent), ``expert_load [E]`` (persistent; running load
    relative to the ideal, 1 = uniform, an exponential moving average with momentum
    ``LOAD_MOMENTUM``) and ``load_since_update [E]`` (selections counted in training forwards).
    :meth:`update_bias` folds the counts into both after the optimizer step, never inside
    ``forward``, so a recomputed forward routes exactly as the original one.
    """

    LOAD_MOMENTUM = 0.9

    def __init__(self, cfg: GoHConfig, allowed: torch.Tensor) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.top_k_experts
        self.aux_free_bias, self.bias_update_rate = cfg.aux_free_bias, cfg.bias_update_rate
        self.sigmoid_scores, self.renormalise = cfg.expert_score == "sigmoid", cfg.expert_renormalise
        self.n_groups, self.top_groups = cfg.n_expert_groups, cfg.top_k_expert_groups
        self.scaling = cfg.routed_scaling_factor
        self.balance_top1 = cfg.expert_balance_top1
        self.z_loss_coef = cfg.z_loss_coef
        reachable = allowed.sum(dim=-1)
        for slot, count in enumerate(reachable.tolist()):
            if count < self.top_k:
                raise ValueError(f"expert_graph lets sub-token slot {slot} reach {count} routed expert(s), "
                                 f"fewer than top_k_experts={self.top_k}")
        self.register_buffer("allowed", allowed.clone(), persistent=False)  # [subtokens, E]
        self.restricted = not bool(allowed.all())
        self.register_buffer("selection_bias", torch.zeros(self.n_experts))
        self.register_buffer("expert_load", torch.ones(self.n_experts))
        self.register_buffer("load_since_update", torch.zeros(self.n_experts), persistent=False)
        # stochastic selection in training (routers/noise.py); the noiseless logits at eval
        self.noise = RouterNoise(cfg.expert_router_noise, cfg.d_model // cfg.n_subtokens, self.n_experts,
                                 cfg.router_jitter_eps)
        # an analysis intervention (gohgraph.analysis.ablation), never saved: [E] bool mask of experts
        # never selected (their sub-tokens take their next choice), or None
        self.forced_off: Optional[torch.Tensor] = None

    def forward(self, logits: torch.Tensor, inputs: Optional[torch.Tensor] = None,
                valid: Optional[torch.Tensor] = None) -> ExpertChoice:
        """``logits [tokens, subtokens, E]`` -> :class:`ExpertChoice`; ``inputs [tokens, subtokens,
        d_sub]`` (the router's input) feed ``"noisy-top-k"``'s learned noise scale. ``valid
        [tokens]`` bool marks real tokens: the sub-tokens of padding (``False``) are routed (the
        record shows where they would go) but add nothing to the losses or the load counts."""
        logits = logits.float()
        if self.restricted:
            logits = logits.masked_fill(~self.allowed, float("-inf"))
        noisy_logits, weight_logits = self.noise(logits, inputs)  # both logits at eval
        if self.sigmoid_scores:
            scores = weight_logits.sigmoid()  # forbidden experts: sigmoid(-inf) = 0
            # DeepSeek-V3 adds its bias to the scores, always
            choice = (scores if noisy_logits is weight_logits else noisy_logits.sigmoid()) + self.selection_bias
            if self.restricted:
                choice = choice.masked_fill(~self.allowed, float("-inf"))
        else:
            choice = noisy_logits + self.selection_bias if self.aux_free_bias else noisy_logits
        if self.forced_off is not None:  # before the groups: a group is scored by the experts it may use
            choice = choice.masked_fill(self.forced_off.to(choice.device), float("-inf"))
        if self.n_groups > 1:
            choice = self._limit_to_groups(choice)
        margins = None
        if self.top_k < choice.shape[-1] and not self.decoding:  # the ranking's margin, for the health scalars
            ranked = choice.detach().topk(self.top_k + 1, dim=-1).values
            margins = ranked[..., -2] - ranked[..., -1]
            margins = margins.masked_fill(~torch.isfinite(margins), float("nan"))
        selected = choice.topk(self.top_k, dim=-1).indices
        if self.sigmoid_scores:
            weights = scores.gather(-1, selected)
            if self.renormalise:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + SIGMOID_NORM_EPS)
        elif self.renormalise:
            weights = torch.softmax(weight_logits.gather(-1, selected), dim=-1)
        else:
            weights = torch.softmax(weight_logits, dim=-1).gather(-1, selected)
        if self.scaling != 1.0:
            weights = weights * self.scaling
        if self.decoding:  # generation: no losses, no counts
            return ExpertChoice(indices=selected, weights=weights, aux_losses={})
        flat_selected = selected.reshape(-1, self.top_k)
        if valid is not None:  # one entry per sub-token
            valid = valid.reshape(-1, 1).expand(-1, logits.shape[1]).reshape(-1)
        if self.training:
            self.count_load(flat_selected, valid)
        flat_logits = logits.reshape(-1, self.n_experts)
        counted = flat_selected[:, :1] if self.balance_top1 else flat_selected  # selected is best first
        balance = BalanceTally.of(torch.softmax(flat_logits, dim=-1), counted, self.n_experts, valid)
        aux = {EXPERT_BALANCE: balance.loss()}
        if self.z_loss_coef:  # a loss with weight 0 is not computed at all
            aux[EXPERT_Z] = router_z_loss(flat_logits, valid)
        return ExpertChoice(indices=selected, weights=weights, aux_losses=aux, balance=balance, margins=margins)

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """``choice [..., E]`` with every expert outside the ``top_groups`` best groups at ``-inf``."""
        grouped = choice.unflatten(-1, (self.n_groups, self.n_experts // self.n_groups))
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [..., groups]
        kept = group_scores.topk(self.top_groups, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter(-1, kept, True)
        return grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).flatten(-2)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Fold the load counted since the last call into the running load and the selection bias.

        Call after ``optimizer.step()`` (:meth:`GoHTransformer.update_routing_biases` does).
        """
        total = self.load_since_update.sum()
        if total == 0:
            return
        relative_load = self.load_since_update * (self.n_experts / total)
        self.expert_load.mul_(self.LOAD_MOMENTUM).add_(relative_load, alpha=1.0 - self.LOAD_MOMENTUM)
        if self.aux_free_bias:
            update_balancing_bias(self.selection_bias, self.load_since_update, self.bias_update_rate)
        self.load_since_update.zero_()
