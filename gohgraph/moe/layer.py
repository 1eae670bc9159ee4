r"""Feed-forward layers: :func:`build_feed_forward` picks the dense MLP or the expert layer, which
covers SMoE, fine-grained SMoE, MH-MoE and GoH-MoE as one module.

docs/experts.md: experts are nodes of the routing graph. A token ``x [d_model]`` becomes ``m``
sub-tokens (MH-MoE's head layer ``W_head``, then a split into ``m`` slices of width ``d/m``; for
``ffn="moe"`` there is no head layer and ``m = 1``); a router picks ``k`` routed experts per
sub-token; dispatch sorts the sub-tokens by expert and the experts run one grouped matmul; the
gate-weighted outputs are added back per sub-token, shared experts (always on) are added to every
sub-token, and the merge layer (concatenate, then ``W_merge``) returns to ``d_model``:

.. math::
    y = W_{merge}\,\big[\ \textstyle\sum_{e \in \mathrm{top}k(s)} w_{s,e}\, E_e(x_s)
        + \sum_{e\ \mathrm{shared}} E_e(x_s)\ \big]_{s=1..m}

* ``ffn="moe"`` (SMoE): linear router, no head/merge layer, ``m = 1``;
* ``ffn="mh-moe"`` (MH-MoE): linear router shared by the sub-token slots, ``W_head`` / ``W_merge``,
  ``m = n_subtokens``;
* ``ffn="graph-moe"`` (GoH-MoE): message passing over the sub-token -> expert graph
  (``cfg.expert_graph`` may restrict which slots reach which experts), ``W_head`` / ``W_merge``,
  ``m = n_subtokens``.

``cfg.subtoken_projections=False`` drops ``W_head`` / ``W_merge`` from both (the MH-MoE paper's
ablation): the token is split and the sub-token outputs concatenated as they are.

Fine-grained SMoE is ``ffn="moe"`` with more, smaller experts (``n_experts``, ``expert_hidden``).
Compute is honest: only the ``k`` selected experts run on a sub-token (no masking of a dense
result); the router, sort, gather and combine are the overhead, and benchmarks/bench_moe.py times it.
Dispatch goes through :attr:`MoEFeedForward.dispatcher` (a :class:`~gohgraph.moe.dispatch.Dispatcher`;
:class:`~gohgraph.moe.dispatch.LocalDispatcher` by default), so expert parallelism swaps it.
Capacity (``cfg.capacity_factor``) binds in training only; evaluation and generation are dropless,
so a token's output never depends on which other tokens share its batch and KV-cached decoding
equals recomputing the whole sequence.

Not saved: the backward writes a full ``[E, d_in, d_out]`` weight gradient (zero for experts that
received nothing), so its memory traffic grows with ``E`` even though the FLOPs do not.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..config import GoHConfig
from ..graph import bipartite_adjacency, expert_graph, head_graph
from ..layers.linear import make_linear, ternary_experts
from ..layers.mlp import build_mlp
from ..routers.experts import ExpertGate, GraphExpertRouter, LinearExpertRouter
from ..routing import ExpertRouting, router_input_rms
from .dispatch import Dispatcher, LocalDispatcher
from .experts import BitNetGroupedExperts, GroupedExperts, SharedExperts

EXPERT_FFNS = ("moe", "mh-moe", "graph-moe")


def build_feed_forward(cfg: GoHConfig, layer_idx: int) -> nn.Module:
    """The feed-forward layer ``cfg.ffn`` names (dense in the first ``cfg.n_dense_layers`` layers):
    ``x [batch, seq, d_model]`` ->
    ``(y [batch, seq, d_model], ExpertRouting | None)``."""
    if cfg.ffn == "dense" or layer_idx < cfg.n_dense_layers:
        return DenseFeedForward(cfg)
    return MoEFeedForward(cfg, layer_idx)


class DenseFeedForward(nn.Module):
    """The dense MLP (SwiGLU or GELU, ``cfg.mlp``) as a feed-forward layer: no experts, no record."""

    def __init__(self, cfg: GoHConfig) -> None:
        super().__init__()
        self.mlp = build_mlp(cfg)

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[ExpertRouting]]:
        return self.mlp(x), None


class MoEFeedForward(nn.Module):
    """Sparse expert FFN for every ``cfg.ffn`` other than ``"dense"``.

    Shapes: ``x [batch, seq, d_model]``, ``token_mask [batch, seq]`` bool or ``None`` (``False``:
    padding, dispatched nowhere) -> ``(y [batch, seq, d_model], ExpertRouting)`` with
    ``expert_indices`` / ``expert_weights`` ``[batch, seq, subtokens, top_k_experts]`` (routed ids
    ``0..n_routed_experts-1``), ``dropped [batch, seq, subtokens]`` and ``expert_drops
    [batch, seq, subtokens, top_k_experts]`` (capacity overflow in training, see
    :mod:`gohgraph.moe.dispatch`; all ``False`` in eval mode, which is dropless).

    Auxiliary losses (unweighted, real tokens only): ``expert_balance`` and ``expert_z`` (not
    computed when ``cfg.z_loss_coef`` is 0). Balancing state lives in
    :attr:`gate`, whose ``update_bias()`` :meth:`GoHTransformer.update_routing_biases` calls after
    the optimizer step.
    """

    def __init__(self, cfg: GoHConfig, layer_idx: int = 0) -> None:
        super().__init__()
        if cfg.ffn not in EXPERT_FFNS:
            raise ValueError(f"ffn={cfg.ffn!r} is not one of {list(EXPERT_FFNS)} for MoEFeedForward")
        self.layer_idx = layer_idx
        self.n_subtokens = cfg.n_subtokens
        self.d_sub = cfg.d_model // cfg.n_subtokens
        self.n_routed, self.top_k = cfg.n_routed_experts, cfg.top_k_experts
        self.capacity_factor = cfg.capacity_factor

        self.has_head_and_merge = cfg.ffn != "moe" and cfg.subtoken_projections
        if self.has_head_and_merge:
            # MH-MoE's head and merge layers; scale-preserving so the small expert init sets the output size
            self.head = make_linear(cfg, cfg.d_model, cfg.d_model, bias=False)
            self.merge = make_linear(cfg, cfg.d_model, cfg.d_model, bias=False)
            nn.init.normal_(self.head.weight, std=cfg.d_model ** -0.5)
            nn.init.normal_(self.merge.weight, std=cfg.d_model ** -0.5)

        edge_index = expert_graph(cfg.expert_graph, self.n_subtokens, self.n_routed)
        allowed = bipartite_adjacency(edge_index, self.n_subtokens, self.n_routed).t()  # [subtokens, E]
        if cfg.ffn == "graph-moe":
            self.router = GraphExpertRouter(self.d_sub, self.n_subtokens, self.n_routed, edge_index,
                                            cfg.router_dim, cfg.router_rounds, cfg.expert_load_feature,
                                            cfg.init_std, head_graph(cfg.expert_peer_graph, self.n_routed))
        else:
            self.router = LinearExpertRouter(self.d_sub, self.n_routed, cfg.init_std)
        self.gate = ExpertGate(cfg, allowed)
        hidden = cfg.expert_hidden_dim
        experts_class = BitNetGroupedExperts if ternary_experts(cfg) else GroupedExperts
        self.experts = experts_class(self.n_routed, self.d_sub, hidden, cfg.expert_activation,
                                     cfg.init_std, cfg.output_init_std)
        self.shared_experts = None
        if cfg.n_shared_experts:
            self.shared_experts = SharedExperts(cfg, self.d_sub, hidden)
        self.dispatcher: Dispatcher = LocalDispatcher(self.n_routed)

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None,
                fused: bool = True) -> Tuple[torch.Tensor, ExpertRouting]:
        """``token_mask [batch, seq]`` bool (``False``: padding) or ``None`` (every token real):
        padding's sub-tokens are routed for the record but dispatched nowhere (no expert compute,
        no capacity, no loss term, no load count; their routed output is 0, their drops ``False``),
        so the real tokens see exactly the batch without the padding.
        ``fused=False`` runs the graph router's PyG reference path (same result, slower)."""
        batch, seq, d_model = x.shape
        n_tokens, m, k = batch * seq, self.n_subtokens, self.top_k
        n_sub = n_tokens * m
        sub = self.head(x) if self.has_head_and_merge else x
        sub = sub.reshape(n_tokens, m, self.d_sub)

        valid = None if token_mask is None else token_mask.reshape(n_tokens).bool()
        choice = self.gate(self.router(sub, expert_load=self.gate.expert_load, fused=fused), sub, valid)
        flat_sub = sub.reshape(n_sub, self.d_sub)
        out, assignment_dropped = self._routed_experts(flat_sub, choice.indices.reshape(n_sub, k),
                                                       choice.weights.reshape(n_sub, k), valid)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat_sub)

        y = out.reshape(batch, seq, d_model)
        if self.has_head_and_merge:
            y = self.merge(y)
        routing = ExpertRouting(
            expert_indices=choice.indices.reshape(batch, seq, m, k).detach(),
            expert_weights=choice.weights.reshape(batch, seq, m, k).detach(),
            dropped=assignment_dropped.all(dim=-1).reshape(batch, seq, m),
            expert_drops=assignment_dropped.reshape(batch, seq, m, k),
            aux_losses=choice.aux_losses,
            balance=choice.balance,
            router_margins=None if choice.margins is None else choice.margins.reshape(batch, seq, m),
            router_input_rms=None if self.gate.decoding else router_input_rms(sub, valid),
        )
        return y, routing

    def _routed_experts(self, flat_sub: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                        valid: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Dispatch, grouped expert compute and combine: ``flat_sub [n_sub, d_sub]``, ``expert_ids``
        and ``weights [n_sub, k]``, ``valid [tokens]`` -> (routed output ``[n_sub, d_sub]``,
        ``assignment_dropped [n_sub, k]``). With ``valid``, only the real tokens' sub-tokens are
        dispatched (in their flat order, so capacity and its priority are the unpadded batch's)."""
        capacity_factor = self.capacity_factor if self.training else None
        if valid is None:
            grouped, group_offsets, plan = self.dispatcher.dispatch(flat_sub, expert_ids, capacity_factor)
            out = self.dispatcher.combine(self.experts(grouped, group_offsets), plan, weights)
            return out, plan.assignment_dropped
        # a data-dependent size: one host sync, and a graph break under torch.compile
        rows = valid.repeat_interleave(self.n_subtokens).nonzero().squeeze(-1)
        grouped, group_offsets, plan = self.dispatcher.dispatch(flat_sub.index_select(0, rows),
                                                                expert_ids.index_select(0, rows), capacity_factor)
        kept = self.dispatcher.combine(self.experts(grouped, group_offsets), plan, weights.index_select(0, rows))
        out = kept.new_zeros(flat_sub.shape[0], kept.shape[-1]).index_copy(0, rows, kept)
        dropped = plan.assignment_dropped.new_zeros(expert_ids.shape).index_copy(0, rows, plan.assignment_dropped)
        return out, dropped

    def extra_repr(self) -> str:
        return (f"subtokens={self.n_subtokens}, d_sub={self.d_sub}, routed={self.n_routed}, "
                f"top_k={self.top_k}, capacity_factor={self.capacity_factor}")
