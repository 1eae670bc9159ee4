"""Head routers: who is active per token, with what weight, and how heads talk.

Five pieces; :class:`HeadRouting` assembles the others for one attention layer
(:class:`~gohgraph.layers.attention.GoHAttention` receives it and calls it with the queries):

* :class:`HeadRouter` (GoH) - a PyG ``MessagePassing`` network over the head graph that turns
  per-head node features into head logits and per-edge attention (the inter-head flow weights);
* :class:`LinearHeadRouter` (MoH) - logits from a linear map of the token, no graph;
* :class:`QueryNormHeadRouter` (MoH-LLaMA3) - parameter-free logits from the queries' norms;
* :class:`HeadGate` - MoH's two-stage top-k gating of those logits (0/1 gates for the
  parameter-free router), the routing losses and the auxiliary-loss-free selection bias;
* :class:`HeadRouting` - router + gate + inter-head flow: ``(x, q) -> (gates, head mixing, record)``,
  and ``mix(heads' outputs, gates, head mixing)``, which applies them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GoHConfig
from ..graph import dense_adjacency, head_graph, with_self_loops
from ..layers.attention import mix_heads
from ..ops.small_softmax import small_softmax
from ..routing import LayerRouting, router_input_rms
from .gat import GraphAttention
from .losses import (
    HEAD_BALANCE,
    HEAD_Z,
    BalancedRouting,
    BalanceTally,
    router_z_loss,
    skips_training_losses,
    update_balancing_bias,
)
from .noise import RouterNoise

# A head graph whose edges (self-loops included) fill at most this share of the heads x heads matrix
# runs the PyG propagate path by default: its cost grows with the edges, the fused path's with
# heads^2. Measured on 2 CPU cores (benchmarks/bench_scaling.py): ring graphs of 64 heads (4.7%)
# are faster on propagate, of 32 heads (9.4%) still faster fused.
SPARSE_GRAPH_FRACTION = 1 / 16
# HeadRouter.message_ablation's values (an analysis intervention: gohgraph.analysis.ablation)
MESSAGE_ABLATIONS = ("no-messages", "empty-graph")


def prefers_fused_path(n_edges: int, n_heads: int) -> bool:
    """Whether the dense ``[heads, heads]`` fused path is the faster one for a head graph with
    ``n_edges`` edges (self-loops excluded): true unless the graph is sparse (see
    :data:`SPARSE_GRAPH_FRACTION`)."""
    return n_edges + n_heads > SPARSE_GRAPH_FRACTION * n_heads * n_heads


class HeadRouter(GraphAttention):
    r"""GAT-style message passing over the heads of one layer, for every token at once.

    Node features (one node per head, docs/routing.md):
    :math:`z^0_i = W_z q_i + e_i`. Each of the ``R`` rounds computes

    .. math::
        h_i = W^r z_i, \quad
        \alpha_{ji} = \mathrm{softmax}_{j \in \mathcal{N}(i) \cup \{i\}}
            \mathrm{LeakyReLU}(a_{dst}^{r\top} h_i + a_{src}^{r\top} h_j), \quad
        z_i \leftarrow z_i + \mathrm{GELU}\Big(\sum_j \alpha_{ji} h_j + c^r\Big)

    and the head logits are :math:`s_i = u^\top z^R_i + b_i`. The last round's
    :math:`\alpha_{ji}` on the graph's edges (self-loops excluded) are the inter-head flow weights.
    With ``n_outputs = O > 1`` each node gets ``O`` logits, :math:`s_{io} = u_o^\top z^R_i + b_{io}`
    (what :class:`~gohgraph.routers.recursion.GraphRecursionScorer` reads out; the head router uses 1).

    Each round's aggregation is :class:`~gohgraph.routers.gat.GraphAttention` over the graph plus
    self-loops, for every token at once. ``fused=True`` computes it with a dense ``[heads, heads]``
    masked softmax and one batched matmul, which avoids PyG's gather/scatter over
    ``tokens x edges``; ``fused=False`` runs ``propagate`` and is the reference. The default
    (``self.fused``) is chosen from the graph: fused unless it is sparse (:func:`prefers_fused_path`),
    since the fused path costs ``heads^2`` per token and ``propagate`` costs ``edges``.

    Args:
        head_dim: width of the per-head query the node features come from.
        n_heads: number of nodes.
        edge_index: ``[2, E]`` head graph without self-loops.
        router_dim: node feature width ``F``.
        rounds: ``R >= 1``.
        n_outputs: logits per node (1: one logit per head).
    Shapes:
        input ``q``: ``[tokens, heads, head_dim]``; output logits ``[tokens, heads]`` (``[tokens,
        heads, n_outputs]`` when ``n_outputs > 1``) and edge weights ``[tokens, E]``.
    """

    def __init__(self, head_dim: int, n_heads: int, edge_index: torch.Tensor, router_dim: int,
                 rounds: int, init_std: float = 0.02, n_outputs: int = 1) -> None:
        super().__init__(with_self_loops(edge_index, n_heads), n_heads, n_heads)
        self.n_heads, self.router_dim, self.rounds, self.init_std = n_heads, router_dim, rounds, init_std
        # fused for dense graphs, PyG propagate (cost ~ edges, and the reference) for sparse ones
        self.fused = prefers_fused_path(edge_index.shape[1], n_heads)
        self.node_in = nn.Linear(head_dim, router_dim, bias=False)
        self.head_embedding = nn.Parameter(torch.empty(n_heads, router_dim))
        self.round_lin = nn.ModuleList(nn.Linear(router_dim, router_dim, bias=False) for _ in range(rounds))
        self.att_src = nn.Parameter(torch.empty(rounds, router_dim))
        self.att_dst = nn.Parameter(torch.empty(rounds, router_dim))
        self.round_bias = nn.Parameter(torch.empty(rounds, router_dim))
        self.n_outputs = n_outputs
        self.score = nn.Linear(router_dim, n_outputs, bias=False)
        # [heads] for one output, as checkpoints of the head router hold it; [heads, n_outputs] else
        self.head_bias = nn.Parameter(torch.empty(n_heads, n_outputs) if n_outputs > 1 else torch.empty(n_heads))

        self.register_buffer("edge_index", edge_index.clone(), persistent=False)
        # position of each edge in a flattened [dst, src] matrix, and the graph without self-loops
        self.register_buffer("edge_slots", edge_index[1] * n_heads + edge_index[0], persistent=False)
        self.register_buffer("graph_mask", dense_adjacency(edge_index, n_heads).float(), persistent=False)
        # an intervention for analysis (gohgraph.analysis.ablation), never saved: None, or one of
        # MESSAGE_ABLATIONS (see forward)
        self.message_ablation: Optional[str] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.node_in.weight, std=1.0 / math.sqrt(self.node_in.in_features))
        nn.init.normal_(self.head_embedding, std=1.0)
        for lin in self.round_lin:
            nn.init.normal_(lin.weight, std=1.0 / math.sqrt(self.router_dim))
        nn.init.normal_(self.att_src, std=1.0 / math.sqrt(self.router_dim))
        nn.init.normal_(self.att_dst, std=1.0 / math.sqrt(self.router_dim))
        nn.init.zeros_(self.round_bias)
        # small head scores: routing starts near uniform, i.e. close to plain multi-head attention
        nn.init.normal_(self.score.weight, std=self.init_std)
        nn.init.zeros_(self.head_bias)

    def forward(self, q: torch.Tensor, fused: Optional[bool] = None,
                dense_weights: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """``q [tokens, heads, head_dim]`` -> (logits ``[tokens, heads]``, edge weights).

        Edge weights are the last round's attention on the graph's edges: ``[tokens, E]`` in
        ``edge_index`` order, or with ``dense_weights`` a ``[tokens, heads(dst), heads(src)]`` matrix
        that is zero off the graph and on the diagonal (what inter-head flow multiplies by; the
        fused path has it already, so it skips a gather and its scatter-backward).
        ``fused=None`` uses ``self.fused``.

        ``self.message_ablation`` (an analysis intervention, :mod:`gohgraph.analysis.ablation`):
        ``"no-messages"`` computes the logits with every node aggregating only itself
        (:math:`\alpha = I`, so a head's logit depends on its own query alone) while the edge
        weights (the inter-head flow) stay those of the full graph; ``"empty-graph"`` does the
        same and also zeroes the edge weights, as a graph without edges would.
        """
        fused = self.fused if fused is None else fused
        logits, alpha = self.node_logits(q, fused)
        if self.message_ablation is not None:
            if self.message_ablation not in MESSAGE_ABLATIONS:
                raise ValueError(f"message_ablation={self.message_ablation!r} must be one of {MESSAGE_ABLATIONS}")
            logits = self.node_logits(q, fused, self_only=True)[0]
            if self.message_ablation == "empty-graph":
                alpha = torch.zeros_like(alpha)
        if fused:
            edge_weights = alpha * self.graph_mask if dense_weights else alpha.flatten(1)[:, self.edge_slots]
        else:
            alpha = alpha[:, :self.edge_index.shape[1]]  # the graph's edges come before the self-loops
            edge_weights = (alpha.new_zeros(alpha.shape[0], self.n_heads ** 2).index_copy(1, self.edge_slots, alpha)
                            .view(-1, self.n_heads, self.n_heads)) if dense_weights else alpha
        return logits, edge_weights

    def node_logits(self, q: torch.Tensor, fused: Optional[bool] = None,
                    self_only: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The ``R`` rounds and the per-node logits: ``q [tokens, heads, head_dim]`` -> (logits
        ``[tokens, heads]`` or ``[tokens, heads, n_outputs]``, the last round's attention ``alpha`` as
        :meth:`~gohgraph.routers.gat.GraphAttention.attend` returns it on that path).

        ``self_only``: no messages between nodes, each aggregates only itself (the softmax over a
        lone self-loop is 1, so the aggregate is ``h_i``); ``alpha`` is then ``None``."""
        fused = self.fused if fused is None else fused
        z = self.node_in(q) + self.head_embedding
        alpha = None
        for r in range(self.rounds):
            h = self.round_lin[r](z)
            if self_only:
                z = z + F.gelu(h + self.round_bias[r])
                continue
            score_src = (h * self.att_src[r]).sum(-1, keepdim=True)  # [tokens, heads, 1]
            score_dst = (h * self.att_dst[r]).sum(-1, keepdim=True)
            aggregated, alpha = self.attend(h, score_src, score_dst, fused=fused)
            z = z + F.gelu(aggregated + self.round_bias[r])
        logits = self.score(z)
        if self.n_outputs == 1:
            logits = logits.squeeze(-1)
        return logits + self.head_bias, alpha

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(heads={self.n_heads}, edges={self.edge_index.shape[1]}, "
                f"feat={self.router_dim}, rounds={self.rounds}"
                + (f", outputs={self.n_outputs})" if self.n_outputs > 1 else ")"))


class LinearHeadRouter(nn.Module):
    """MoH's router: head logits ``s = W_r x`` from the token itself; no graph, no flow.

    Shapes: ``x [tokens, d_model]`` -> logits ``[tokens, heads]``.
    """

    def __init__(self, d_model: int, n_heads: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, n_heads, bias=False)
        nn.init.normal_(self.proj.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


# keeps a token whose heads' query norms are all equal (std 0) finite: its logits are then all 0
QUERY_NORM_STD_EPS = 1e-6


class QueryNormHeadRouter(nn.Module):
    r"""MoH-LLaMA3's parameter-free router (continue-tuning a dense model, docs/routing.md).

    A head's logit is the L2 norm of its query, normalised by the spread of those norms over the
    token's heads:

    .. math::
        s_i = \frac{\lVert q_i \rVert_2}{\mathrm{std}_j \lVert q_j \rVert_2 + \epsilon}

    (``std`` is torch's default, Bessel-corrected, over all heads). The gate that reads these
    logits gives 0/1 gates: shared heads 1, the top-``k`` routed heads by :math:`s` 1, others 0, so
    with every head selected the layer is exactly the dense attention it came from, and nothing
    needs training. Queries are taken before RoPE, which is a rotation and keeps their norms.

    Shapes: ``q [tokens, heads, head_dim]`` -> logits ``[tokens, heads]`` (float32).
    """

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        norms = q.float().norm(dim=-1)
        return norms / (norms.std(dim=-1, keepdim=True) + QUERY_NORM_STD_EPS)


@dataclass
class HeadGating:
    """Output of :class:`HeadGate` for ``tokens`` tokens."""

    gates: torch.Tensor  # [tokens, heads], 0 for inactive heads
    aux_losses: Dict[str, torch.Tensor]
    # [tokens, heads] in [0, 1]: 1 for selected heads, 0 for unselected, dense_blend in between
    # (None when the caller asked for none: only inter-head flow reads it)
    active: Optional[torch.Tensor] = None
    # the counts and probability sums behind head_balance (BalanceTally), for global-batch pooling
    balance: Optional[BalanceTally] = None


class HeadGate(BalancedRouting):
    r"""Two-stage MoH gating with top-k routed heads and always-on shared heads.

    With router logits ``s`` (``[tokens, heads]``, shared heads first):
    routed heads keep their top-``k`` logits (selected with ``s + bias``; the bias only selects),
    :math:`p^r = \mathrm{softmax}` over the kept logits (the full softmax renormalised over the
    selection), shared heads get :math:`p^s = \mathrm{softmax}` over the shared logits. Then, by
    ``cfg.head_gate_normalisation``:

    * ``"moh"`` (SkyworkAI/MoH's released code, docs/routing.md): :math:`[w_s, w_r] = 2\,\mathrm{softmax}(W_0 x)`
      (no bias), :math:`g_i = w_s H_s p^s_i` (shared) and :math:`w_r k\, p^r_i` (kept routed), else 0.
      The total gate mass varies per token, between :math:`2\min(H_s, k)` and :math:`2\max(H_s, k)`.
      Without routed heads MoH computes no gates: every head gets 1. :math:`W_0` starts at 0, so
      uniform logits give gate 1 on every active head.
    * ``"mha"``: :math:`[a_s, a_r] = \mathrm{softmax}(W_a x + b)`, :math:`g_i = (H_s + k)\, a_s p^s_i`
      or :math:`(H_s + k)\, a_r p^r_i`: gates always sum to :math:`H_s + k`, and :math:`b` starts at
      :math:`a_s = H_s / (H_s + k)`, so uniform logits give gate 1 on every active head and all
      heads on is exactly multi-head attention. Not MoH's gating unless :math:`H_s = k`.

    * ``router="query-norm"`` (MoH-LLaMA3): 0/1 gates, 1 on shared and selected routed heads; no
      stage weights, no losses (nothing in the router is trained).

    Losses (routed heads, training only): ``head_balance``
    (:func:`~gohgraph.routers.losses.load_balance_loss`) and ``head_z``
    (:func:`~gohgraph.routers.losses.router_z_loss`, not computed when ``cfg.z_loss_coef`` is 0),
    over the real tokens only, as are the load counts behind the selection bias.

    Routing runs in float32 whatever the autocast dtype (bf16 ties change the selected set).
    In training, ``cfg.head_router_noise`` makes the selection stochastic (:mod:`~gohgraph.routers.noise`).

    ``dense_blend`` (a buffer, default 0) anneals a converted dense model into a routed one, as
    MoH's continue-tuning does: the output gates are ``blend * 1 + (1 - blend) * g``, so 1.0 is
    exactly dense multi-head attention and 0.0 the gating above. Set it with
    :meth:`~gohgraph.GoHTransformer.set_dense_blend` (schedule:
    :func:`gohgraph.training.schedules.dense_to_sparse_schedule`).
    """

    def __init__(self, cfg: GoHConfig) -> None:
        super().__init__()
        self.n_shared, self.n_routed, self.top_k = cfg.n_shared_heads, cfg.n_routed_heads, cfg.active_routed_heads
        self.aux_free_bias, self.bias_update_rate = cfg.aux_free_bias, cfg.bias_update_rate
        self.z_loss_coef = cfg.z_loss_coef
        self.binary = cfg.router == "query-norm"
        self.two_stage = self.n_shared > 0 and self.n_routed > 0 and not self.binary
        self.moh_scale = cfg.head_gate_normalisation == "moh"
        if self.two_stage:
            self.stage_mix = nn.Linear(cfg.d_model, 2, bias=not self.moh_scale)
            nn.init.zeros_(self.stage_mix.weight)
            if self.stage_mix.bias is not None:
                with torch.no_grad():
                    self.stage_mix.bias.copy_(torch.tensor([math.log(self.n_shared / self.top_k), 0.0]))
        self.register_buffer("selection_bias", torch.zeros(self.n_routed))
        self.register_buffer("load_since_update", torch.zeros(self.n_routed), persistent=False)
        # stochastic selection in training (routers/noise.py); the noiseless logits at eval
        self.noise = RouterNoise(cfg.head_router_noise, cfg.d_model, self.n_routed, cfg.router_jitter_eps)
        # persistent: a converted checkpoint must reload as the dense model it was converted from
        self.register_buffer("dense_blend", torch.zeros(()))
        # set by GoHTransformer.generate for its duration: no losses, and the blend read once
        self.decoding = False
        self.decoding_blend: Optional[float] = None
        # analysis interventions (gohgraph.analysis.ablation), never saved: [heads] bool masks of the
        # heads forced off (gate 0) and forced on (gate 1), or None
        self.forced_off: Optional[torch.Tensor] = None
        self.forced_on: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, logits: torch.Tensor, valid: Optional[torch.Tensor] = None,
                with_active: bool = True) -> HeadGating:
        """``x [tokens, d_model]``, ``logits [tokens, heads]`` -> gates ``[tokens, heads]`` + losses.

        ``valid [tokens]`` bool marks real tokens (``False``: padding): padding is gated like any
        token (its output is never seen) but adds nothing to the losses or the load counts.
        ``with_active=False`` leaves :attr:`HeadGating.active` ``None`` (only inter-head flow reads it)."""
        logits = logits.float()
        shared_logits, routed_logits = logits[:, :self.n_shared], logits[:, self.n_shared:]
        parts, aux, balance = [], {}, None
        if self.n_shared:
            parts.append(small_softmax(shared_logits, dim=-1))
        if self.n_routed:
            routed_gates, selected, aux, balance = self._route(routed_logits, x, valid)
            parts.append(routed_gates)
        if self.binary:
            gates = logits.new_ones(logits.shape)
            if self.n_routed:
                gates[:, self.n_shared:] = torch.zeros_like(routed_logits).scatter(-1, selected, 1.0)
            aux, balance = {}, None  # a parameter-free router has nothing to balance by gradient
        elif self.moh_scale:
            gates = self._moh_gates(x, parts)
        else:
            if self.two_stage:
                mix = small_softmax(self.stage_mix(x).float(), dim=-1)
                parts = [mix[:, :1] * parts[0], mix[:, 1:] * parts[1]]
            gates = torch.cat(parts, dim=-1) * (self.n_shared + self.top_k)
        active = (gates > 0).float() if with_active else None
        if self.decoding_blend != 0.0:  # read once per generate call; the common case skips the blend
            # no branch on the blend (that would sync the device); at blend 0 this is exactly 0 + 1 * gates
            blend = self.dense_blend.float().clamp(0.0, 1.0)
            gates = blend + (1.0 - blend) * gates
            active = None if active is None else blend + (1.0 - blend) * active
        if self.forced_off is not None or self.forced_on is not None:
            gates, active = self._force(gates), None if active is None else self._force(active)
        return HeadGating(gates=gates, aux_losses=aux, active=active, balance=balance)

    def _force(self, values: torch.Tensor) -> torch.Tensor:
        """``values [tokens, heads]`` with the forced-off heads at 0 and the forced-on ones at 1 (a
        knock-out keeps the other heads' gates as they are: nothing is renormalised or re-routed)."""
        if self.forced_on is not None:
            values = values.masked_fill(self.forced_on.to(values.device), 1.0)
        if self.forced_off is not None:
            values = values.masked_fill(self.forced_off.to(values.device), 0.0)
        return values

    def _moh_gates(self, x: torch.Tensor, parts: list) -> torch.Tensor:
        """MoH's released scaling: shared x H_s, routed x k, stages by 2 softmax(W_0 x)."""
        if not self.n_routed:  # MoH without routed heads has no gating at all
            return torch.ones_like(parts[0])
        routed = parts[-1] * self.top_k
        if not self.two_stage:
            return routed
        stage = 2.0 * small_softmax(self.stage_mix(x).float(), dim=-1)
        return torch.cat([stage[:, :1] * parts[0] * self.n_shared, stage[:, 1:] * routed], dim=-1)

    def _route(self, routed_logits: torch.Tensor, x: torch.Tensor, valid: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor], Optional[BalanceTally]]:
        """-> (routed gates ``[tokens, routed]``, selected ids ``[tokens, k]``, losses, the balance
        tally behind ``head_balance``)."""
        noisy_logits, weight_logits = self.noise(routed_logits, x)  # both routed_logits at eval
        selection_logits = noisy_logits + self.selection_bias if self.aux_free_bias else noisy_logits
        selected = selection_logits.topk(self.top_k, dim=-1).indices  # [tokens, k]
        kept = small_softmax(weight_logits.gather(-1, selected), dim=-1)
        gates = torch.zeros_like(routed_logits).scatter(-1, selected, kept)
        if self.training and self.aux_free_bias:
            self.count_load(selected, valid)
        if self.binary or self.decoding or skips_training_losses():  # no training signal needed
            return gates, selected, {}, None
        balance = BalanceTally.of(small_softmax(routed_logits, dim=-1), selected, self.n_routed, valid)
        aux = {HEAD_BALANCE: balance.loss()}
        if self.z_loss_coef:  # a loss with weight 0 is not computed at all
            aux[HEAD_Z] = router_z_loss(routed_logits, valid)
        return gates, selected, aux, balance

    def most_active_heads(self) -> Optional[int]:
        """At most how many heads a token's gates leave non-zero while decoding, when that is fewer
        than all (shared + top-k; a compiled decode step gathers that many heads by index), else
        ``None``: not decoding, a dense blend (every head carries weight), forced heads (an
        analysis intervention) or nothing routed."""
        if not self.decoding or self.decoding_blend != 0.0 or self.forced_on is not None or self.forced_off is not None:
            return None
        active = self.n_shared + self.top_k
        return active if self.n_routed and active < self.n_shared + self.n_routed else None

    def set_decoding(self, decoding: bool) -> None:
        """Enter (or leave) decoding: losses are skipped and the blend is read once, here, so a
        decode step neither computes nor branches on what inference does not need."""
        self.decoding = decoding
        self.decoding_blend = float(self.dense_blend.clamp(0.0, 1.0)) if decoding else None

    def update_bias(self) -> None:
        """Nudge the selection bias toward equal load; call after ``optimizer.step()``."""
        if self.aux_free_bias:
            update_balancing_bias(self.selection_bias, self.load_since_update, self.bias_update_rate)
            self.load_since_update.zero_()


class HeadRouting(nn.Module):
    """Everything that routes the heads of one attention layer: router, gate and inter-head flow.

    ``router="graph"``: :class:`HeadRouter` over ``cfg.head_graph`` (plus MoH's token logits with
    ``router_token_logits``), and with ``inter_head_flow`` a learned per-head flow scale ``γ``
    initialised to 0, so a fresh GoH layer starts as MoH; ``router="linear"``:
    :class:`LinearHeadRouter`; ``router="query-norm"``: :class:`QueryNormHeadRouter`. Then
    :class:`HeadGate`.

    With flow, ``y_i = g_i o_i + g_i γ_i Σ_{j→i, j active} β_ji o_j = (M o)_i`` with
    ``M = diag(g) + diag(g γ) B``: one small batched matmul by ``M [batch, seq, heads, heads]``
    applies gates and flow together. Without flow the gates are a plain multiply.

    Shapes: ``x [batch, seq, d_model]`` (what the linear routers and the stage mix read),
    ``q [batch, seq, heads, head_dim]`` (pre-RoPE queries, what the graph router reads),
    ``token_mask [batch, seq]`` bool or ``None`` (``False``: padding, which adds nothing to the
    routing losses or the balancing counts) ->
    ``(gates [batch, seq, heads], mixing [batch, seq, heads, heads] or None, LayerRouting)``.
    """

    def __init__(self, cfg: GoHConfig) -> None:
        super().__init__()
        if cfg.router == "dense":
            raise ValueError("router='dense' routes nothing: build no HeadRouting for it")
        self.router_kind, self.n_heads = cfg.router, cfg.n_heads
        self.flow_scale: Optional[nn.Parameter] = None
        self.token_router: Optional[nn.Module] = None
        if cfg.router == "graph":
            edge_index = head_graph(cfg.head_graph, cfg.n_heads)
            self.router = HeadRouter(cfg.query_head_dim, cfg.n_heads, edge_index, cfg.router_dim,
                                     cfg.router_rounds, cfg.init_std)
            if cfg.inter_head_flow and edge_index.shape[1] > 0:
                self.flow_scale = nn.Parameter(torch.zeros(cfg.n_heads))
            if cfg.router_token_logits:
                self.token_router = LinearHeadRouter(cfg.d_model, cfg.n_heads, cfg.init_std)
        elif cfg.router == "query-norm":
            self.router = QueryNormHeadRouter()
        else:
            self.router = LinearHeadRouter(cfg.d_model, cfg.n_heads, cfg.init_std)
        self.gate = HeadGate(cfg)
        # torch.compile'd route() for one-token decode steps (compile_for_decoding); a plain
        # attribute, not a submodule, so checkpoints never see it
        self.compiled_route: Optional[Callable] = None

    def forward(self, x: torch.Tensor, q: torch.Tensor, token_mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], LayerRouting]:
        if self.compiled_route is not None and self.gate.decoding and q.shape[1] == 1:
            return self.compiled_route(x, q)  # decoding computes no losses and counts nothing
        return self.route(x, q, token_mask)

    def most_active_heads(self) -> Optional[int]:
        """At most how many heads a decoding token keeps (:meth:`HeadGate.most_active_heads`), or ``None``."""
        return self.gate.most_active_heads()

    def mix(self, attn: torch.Tensor, gates: torch.Tensor, mixing: Optional[torch.Tensor]) -> torch.Tensor:
        """Apply what :meth:`forward` returned to the heads' outputs ``attn [batch, seq, heads, d_v]``
        (:func:`~gohgraph.layers.attention.mix_heads`); the attention calls it, so a routing whose heads
        are split over ranks (:mod:`gohgraph.parallel.tensor_parallel`) can fetch the sources it mixes."""
        return mix_heads(attn, gates, mixing)

    def compile_for_decoding(self, enabled: bool = True) -> None:
        """Route one-token decode steps (inside ``generate``) through ``torch.compile(route)``
        (shapes fixed at decode, so it compiles once per batch size); everything else stays eager.
        Outputs equal the eager path's (tests/models/test_compile.py)."""
        self.compiled_route = torch.compile(self.route, fullgraph=True, dynamic=False) if enabled else None

    def route(self, x: torch.Tensor, q: torch.Tensor, token_mask: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor], LayerRouting]:
        """See the class docstring; :meth:`forward` calls this eagerly or compiled."""
        (batch, seq), heads = q.shape[:2], self.n_heads
        tokens_x = x.reshape(batch * seq, -1)
        edge_weights = None
        if self.router_kind == "graph":
            logits, edge_weights = self.router(q.reshape(batch * seq, heads, -1),
                                               dense_weights=self.flow_scale is not None)
            if self.token_router is not None:
                logits = logits + self.token_router(tokens_x)
        elif self.router_kind == "query-norm":
            logits = self.router(q.reshape(batch * seq, heads, -1))
        else:
            logits = self.router(tokens_x)
        gating = self.gate(tokens_x, logits, None if token_mask is None else token_mask.reshape(batch * seq),
                           with_active=self.flow_scale is not None)
        gates = gating.gates.to(x.dtype)  # [tokens, heads]

        mixing = flow = None
        if self.flow_scale is not None:
            # [tokens, dst, src]: only active sources send; while dense_blend anneals, unselected
            # heads send at the blend weight
            flow_matrix = edge_weights * gating.active.to(x.dtype)[:, None, :]
            mixing = torch.diag_embed(gates) + (gates * self.flow_scale)[:, :, None] * flow_matrix
            mixing = mixing.view(batch, seq, heads, heads)
            with torch.no_grad():
                flow = flow_matrix.flatten(1)[:, self.router.edge_slots]
        routing = LayerRouting(
            head_gates=gates.detach().view(batch, seq, heads),
            head_logits=logits.detach().view(batch, seq, heads),
            flow=None if flow is None else flow.view(batch, seq, -1),  # computed under no_grad
            head_losses=gating.aux_losses,
            head_balance=gating.balance,
            # a health statistic of training and evaluation: decoding skips it
            router_input_rms=None if self.gate.decoding else router_input_rms(
                tokens_x if self.router_kind not in ("graph", "query-norm") else q, token_mask),
        )
        return gates.view(batch, seq, heads), mixing, routing

