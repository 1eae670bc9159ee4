"""GoH attention: multi-head attention whose heads are routed per token over a head graph.

``router="dense"`` is exactly standard MHA/GQA/MQA, ``router="linear"`` is MoH and
``router="graph"`` is GoH (docs/routing.md): one class, three configurations. The attention does
not know how heads are routed: it receives a builder of the head-routing module
(:class:`gohgraph.routers.heads.HeadRouting`, chosen by the block), builds it after its own
projections (so parameters are initialised in the order of every earlier checkpoint) and calls it
with the token and its per-head queries; what comes back (gates, a head-mixing matrix, a routing
record) is data the attention hands back to the routing's ``mix`` with the heads' outputs.

Head counts are read from the tensors (``view(batch, seq, -1, head_dim)``) and the projection
widths from ``n_heads``/``n_kv_heads``, which count the heads *this module computes*: tensor
parallelism (:mod:`gohgraph.parallel.tensor_parallel`) shards the projections from outside and sets
them to the local counts, torchtitan style.

Compute (docs/skipping-work.md): with ``cfg.head_execution="sparse"`` (or ``"auto"`` at sizes where it pays,
:func:`~gohgraph.layers.head_sparse.picks_head_sparse`) the attention scores and values run only for
the (token, head) pairs with a non-zero gate (:mod:`gohgraph.layers.head_sparse`); keys and values
are computed and cached for every head; inside the compiled decode step the active heads are
gathered by index instead (:func:`~gohgraph.layers.head_sparse.picks_gathered_heads`). ``"masked"``,
the reference, computes every head and lets the zero gates remove the inactive ones. The query
projection runs for every head in every mode (the graph and query-norm routers read every head's
query), and so does the output projection (a decode step that read only the active heads' columns
of ``W_O`` measured 2.5% slower on CPU: BENCHMARKS.md).

``cfg.talking_heads`` (Shazeer et al. 2020) mixes the heads' attention logits and weights with two
learned ``[heads, heads]`` matrices (:func:`talking_heads_attention`): an explicit score tensor
instead of SDPA, always the masked mode (every head feeds every other, nothing can be skipped),
and the routing's gates and flow applied to its outputs as to SDPA's.

``cfg.n_attention_experts`` (SwitchHead, Csordás et al. 2024) replaces the value and output
projections by per-head experts chosen per token by a sigmoid top-k
(:class:`~gohgraph.layers.switch_head.SwitchHeadProjections`); ``qkv`` then projects only queries
and keys, and the record's ``value_experts``/``output_experts`` hold the choices.

``cfg.n_mosa_heads`` (MoSA, Piękos et al. 2025) adds sparse heads beside the dense ones
(:class:`~gohgraph.layers.mosa.MixtureOfSparseAttention`): each attends among the tokens its router
keeps, and its output is added to the dense heads'; the record's ``sparse_heads`` holds the choices.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GoHConfig
from ..routing import ExpertRouting, LayerRouting
from .head_sparse import (
    gathered_head_attention,
    head_sparse_attention,
    picks_gathered_heads,
    picks_head_sparse,
)
from .kv_cache import KVCache
from .linear import make_linear
from .mosa import MixtureOfSparseAttention
from .positions import build_query_key_positions, build_score_positions
from .switch_head import SwitchHeadProjections


class GoHAttention(nn.Module):
    """Self- or cross-attention with routed heads and inter-head flow.

    Steps (docs/routing.md): q/k/v projections (GQA when ``n_kv_heads < n_heads``); ``head_routing``
    (built by ``build_head_routing(cfg)``; none for dense attention) reads the token and the pre-RoPE per-head queries and returns gates ``g [batch, seq, heads]``
    and, with inter-head flow, a head-mixing matrix ``M [batch, seq, heads, heads]``; positions
    (RoPE) and SDPA per head; output ``y = W_O (M o)`` (or ``W_O (g ⊙ o)`` without flow).

    Arguments of a call, so one class serves decoders, encoders and encoder–decoder models:

    * ``causal``: queries see only keys at or before their position (bottom-right aligned after
      a cache, so new queries sit at the end of the cached sequence);
    * ``mask``: bool, broadcastable to ``[batch, heads, q_len, k_len]``, ``True`` where a query
      may attend (e.g. ``padding[:, None, None, :]``); combined with ``causal``;
    * ``memory``: ``[batch, mem_len, d_model]``: keys and values come from it instead of ``x``
      (cross-attention; no rotary positions, since queries and memory have separate positions);
    * ``positions``: ``[batch, seq]`` positions of this call's tokens (left-padded batches count
      from each row's first real token); by default ``cache length + t``;
    * ``cache``: a :class:`~gohgraph.layers.kv_cache.KVCache` that receives this call's keys
      and values and returns every cached one; one that returns all its slots
      (:class:`~gohgraph.layers.kv_cache.StaticSlotWriter`, compiled decoding) needs ``positions``
      and a ``mask`` covering causality, padding and unwritten slots (no window, no score bias).
    * ``memory_kv``: cross-attention keys and values already projected by :meth:`project_memory`
      (``[batch, kv_heads, mem_len, head_dim]`` each), so a decoding loop projects the memory once;
    * ``bias``: float, broadcastable to ``[batch, heads, q_len, k_len]``, added to the scores
      (T5's relative-position bias);
    * ``token_mask``: bool ``[batch, seq]``, ``False`` at this call's padded queries: handed to the
      head routing, where padding adds no routing loss and no balancing count.

    ``cfg.attention_scale="none"`` drops the ``1/sqrt(head_dim)`` of the scores (T5).

    Shapes: ``x [batch, seq, d_model]`` -> ``y [batch, seq, d_model]`` and a :class:`LayerRouting`
    with the attention fields filled.
    """

    def __init__(self, cfg: GoHConfig, layer_idx: int,
                 build_head_routing: Optional[Callable[[GoHConfig], nn.Module]] = None) -> None:
        super().__init__()
        if (build_head_routing is None) != (cfg.router == "dense"):
            raise ValueError(f"router={cfg.router!r} needs a head-routing builder exactly when it routes heads; "
                             "build the attention with gohgraph.models.block.build_attention(cfg, layer_idx)")
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        # the heads a routing record covers: all of them, also when this module computes a share
        self.record_heads = cfg.n_heads
        self.dropout = cfg.dropout
        # SwitchHead: values and output come from experts, so qkv projects queries and keys only
        self.switch_head = SwitchHeadProjections(cfg) if cfg.n_attention_experts else None
        projected_heads = cfg.n_heads + (1 if self.switch_head is not None else 2) * cfg.kv_heads
        self.qkv = make_linear(cfg, cfg.d_model, projected_heads * cfg.head_dim, bias=cfg.linear_bias)
        self.out = make_linear(cfg, cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.linear_bias) \
            if self.switch_head is None else None
        nn.init.normal_(self.qkv.weight, std=cfg.init_std)
        if self.out is not None:
            nn.init.normal_(self.out.weight, std=cfg.output_init_std)
        for linear in (self.qkv, self.out):
            if linear is not None and linear.bias is not None:
                nn.init.zeros_(linear.bias)
        # RoPE rotates q and k here, ALiBi biases the scores; absolute positions (GPT-2) are added
        # to the embedding by the model
        self.rotary = build_query_key_positions(cfg)
        self.score_bias = build_score_positions(cfg)
        self.sliding_window = cfg.sliding_window
        self.scale = None if cfg.attention_scale == "sqrt" else 1.0  # None: SDPA's 1/sqrt(head_dim)
        self.head_routing = build_head_routing(cfg) if build_head_routing is not None else None
        # docs/skipping-work.md: shared heads are active for every token; the others only where routed
        self.n_shared_heads, self.head_execution = cfg.n_shared_heads, cfg.head_execution
        # talking heads: P_l and P_w, registered only when on so that every other checkpoint loads
        # unchanged; the identity makes a fresh layer dense attention
        self.talking_heads = cfg.talking_heads
        if cfg.talking_heads:
            self.talking_logit_mixing = nn.Parameter(torch.eye(cfg.n_heads))
            self.talking_weight_mixing = nn.Parameter(torch.eye(cfg.n_heads))
        # MoSA: sparse heads beside the dense ones, registered only when on (every other
        # checkpoint keeps its parameters)
        self.sparse_heads = MixtureOfSparseAttention(cfg, layer_idx) if cfg.n_mosa_heads else None

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, causal: bool = True,
                mask: Optional[torch.Tensor] = None, memory: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None,
                memory_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                bias: Optional[torch.Tensor] = None,
                token_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, LayerRouting]:
        batch, seq, _ = x.shape
        heads, kv_heads, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        value_record = None
        if memory_kv is not None:
            q, k, v = self._project_queries(x), None, None
        else:
            q, k, v, value_record = self._project(x, memory)
        q = q.view(batch, seq, heads, head_dim)  # heads: this module's (local under tensor parallelism)
        if self.head_routing is not None:
            head_gates, head_mixing, routing = self.head_routing(x, q, token_mask)
        else:
            head_gates = head_mixing = None
            routing = LayerRouting(head_gates=x.new_ones(batch, seq, self.record_heads))

        q = q.transpose(1, 2)
        cross = memory is not None or memory_kv is not None
        if memory_kv is not None:
            k, v = memory_kv
        else:
            offset = cache.length(self.layer_idx) if cache is not None and positions is None else 0
            k = k.view(batch, k.shape[1], kv_heads, head_dim).transpose(1, 2)
            if self.rotary is not None and not cross:
                q, k = self.rotary(q, k, offset if positions is None else positions)
            v = v.view(batch, v.shape[1], kv_heads, head_dim).transpose(1, 2)
            if cache is not None:
                k, v = cache.append(self.layer_idx, k, v)
        all_slots = cache is not None and cache.returns_all_slots  # the mask alone says which slots are seen
        if all_slots:
            attn_mask, is_causal = mask, False
        else:
            attn_mask, is_causal = attention_mask(q, k.shape[2], causal, mask, not cross, self.sliding_window,
                                                  self.score_bias if not cross else None, bias)
        sparse = self.head_routing is not None and self._skips_heads(head_gates, q.shape[2], k.shape[2])
        # inside the compiled decode step (all slots, one key mask for every head): this many heads
        # gathered by index, or None
        gathered_heads = (self._gathered_heads(q.shape[2], k.shape[2])
                          if self.head_routing is not None and not sparse and all_slots and attn_mask is not None
                          and attn_mask.dim() == 4 and attn_mask.shape[1] == 1 else None)
        if sparse:  # only the (token, head) pairs with a non-zero gate
            attn = head_sparse_attention(q, k, v, head_gates != 0, self.n_shared_heads, attn_mask, is_causal,
                                         causal_keys=causal and not cross and not all_slots, scale=self.scale)
        elif gathered_heads is not None:
            attn = gathered_head_attention(q, k, v, head_gates != 0, gathered_heads, attn_mask, scale=self.scale)
        elif self.talking_heads:
            attn = talking_heads_attention(q, k, v, self.talking_logit_mixing, self.talking_weight_mixing,
                                           attn_mask, is_causal, scale=self.scale,
                                           dropout=self.dropout if self.training else 0.0)
        else:  # the reference: every head attends, the gates zero the inactive ones
            attn = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_heads != self.n_heads)  # [batch, heads, seq, head_dim]

        attn = attn.transpose(1, 2)  # [batch, seq, heads, head_dim]
        if self.head_routing is not None:
            attn = self.head_routing.mix(attn, head_gates, head_mixing)
        if self.switch_head is not None:
            routing.value_experts = value_record
            y, routing.output_experts = self.switch_head.output(attn, x)
        else:
            y = self.out(attn.reshape(batch, seq, heads * head_dim))
        if self.sparse_heads is not None:
            sparse_y, routing.sparse_heads = self.sparse_heads(x, self.rotary, positions, cache, mask, token_mask)
            y = y + sparse_y
        return y, routing

    @property
    def heads_split_over_ranks(self) -> bool:
        """Under tensor parallelism (:mod:`gohgraph.parallel.tensor_parallel`) this module holds
        ``n_heads`` of the ``record_heads`` heads, and ``out`` is row-parallel."""
        return self.n_heads != self.record_heads

    @property
    def q_width(self) -> int:
        return self.n_heads * self.head_dim

    def project_memory(self, memory: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values of ``memory [batch, mem_len, d_model]``, each
        ``[batch, kv_heads, mem_len, head_dim]``: what ``forward(..., memory_kv=)`` takes."""
        weight, bias = self.qkv.weight, self.qkv.bias
        kv = F.linear(memory, weight[self.q_width:], None if bias is None else bias[self.q_width:])
        k, v, _ = self._split_keys_values(kv, memory)
        shape = (memory.shape[0], memory.shape[1], self.n_kv_heads, self.head_dim)
        return k.reshape(shape).transpose(1, 2), v.reshape(shape).transpose(1, 2)

    def _project_queries(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.qkv.weight, self.qkv.bias
        return F.linear(x, weight[:self.q_width], None if bias is None else bias[:self.q_width])

    def _project(self, x: torch.Tensor, memory: Optional[torch.Tensor]
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[ExpertRouting]]:
        """``q [batch, seq, H*d_h]`` from ``x``; ``k, v [batch, len, H_kv*d_h]`` from ``memory`` or
        ``x``; SwitchHead's value choices (``None`` without it)."""
        if memory is None:
            qkv = self.qkv(x)
            return (qkv[..., :self.q_width], *self._split_keys_values(qkv[..., self.q_width:], x))
        weight, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(x, weight[:self.q_width], None if bias is None else bias[:self.q_width])
        kv = F.linear(memory, weight[self.q_width:], None if bias is None else bias[self.q_width:])
        return (q, *self._split_keys_values(kv, memory))

    def _split_keys_values(self, kv: torch.Tensor, source: torch.Tensor
                           ) -> Tuple[torch.Tensor, torch.Tensor, Optional[ExpertRouting]]:
        """Keys and values from the projected ``kv`` of ``source``: with SwitchHead ``kv`` holds the
        keys only and the value experts read ``source``."""
        if self.switch_head is None:
            k, v = kv.chunk(2, dim=-1)
            return k, v, None
        v, record = self.switch_head.values(source)
        return kv, v, record

    def _gathered_heads(self, q_len: int, k_len: int) -> Optional[int]:
        """How many heads a compiled decode call gathers, or ``None`` when it does not
        (:func:`~gohgraph.layers.head_sparse.picks_gathered_heads`)."""
        most_active = self.head_routing.most_active_heads()
        gathers = picks_gathered_heads(self.head_execution, most_active, self.n_heads, q_len, k_len,
                                       dropout=self.dropout if self.training else 0.0,
                                       sharded=self.heads_split_over_ranks, mixes_heads=self.talking_heads)
        return most_active if gathers else None

    def _skips_heads(self, head_gates: torch.Tensor, q_len: int, k_len: int) -> bool:
        """Whether this call runs head-sparse (:func:`~gohgraph.layers.head_sparse.picks_head_sparse`)."""
        return picks_head_sparse(self.head_execution, head_gates, q_len, k_len,
                                 dropout=self.dropout if self.training else 0.0, mixes_heads=self.talking_heads)


def talking_heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, logit_mixing: torch.Tensor,
                            weight_mixing: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                            is_causal: bool = False, scale: Optional[float] = None,
                            dropout: float = 0.0) -> torch.Tensor:
    r"""Talking-heads attention (Shazeer et al. 2020, arXiv 2003.02436), with the heads' logits and
    weights mixed by :math:`P_\ell` (``logit_mixing``) and :math:`P_w` (``weight_mixing``):

    .. math::
        L_h = s\, Q_h K_h^\top, \quad
        L'_h = \sum_j P_\ell[h, j]\, L_j + \mathrm{mask}_h, \quad
        W = \mathrm{softmax}(L'), \quad
        W'_h = \sum_j P_w[h, j]\, W_j, \quad
        o_h = W'_h V_h

    (:math:`s = 1/\sqrt{d}` unless ``scale`` is given). The mask (causality, padding, windows,
    ALiBi or T5 biases: what :func:`attention_mask` returns) is applied to the mixed logits
    :math:`L'`, so a masked key gets no weight in any head. With both matrices the identity this is
    SDPA; unlike it, the ``[batch, heads, q_len, k_len]`` scores are materialised (and attention
    dropout, as SDPA's, falls on the weights that reach the values, :math:`W'`).

    Args:
        q: ``[batch, heads, q_len, d]``.
        k, v: ``[batch, kv_heads, k_len, d]`` and ``[batch, kv_heads, k_len, d_v]`` (GQA/MQA when
            ``kv_heads < heads``: query head ``h`` reads kv head ``h // (heads / kv_heads)``).
        logit_mixing, weight_mixing: ``[heads, heads]``.
        attn_mask: bool (``True`` where a query may attend) or additive, broadcastable to
            ``[batch, heads, q_len, k_len]``.
        is_causal: SDPA's flag: query ``i`` sees keys ``j <= i`` (``q_len == k_len``).
    Returns:
        ``[batch, heads, q_len, d_v]``.
    """
    heads, q_len, k_len = q.shape[1], q.shape[2], k.shape[2]
    if k.shape[1] != heads:  # GQA: every query head reads its group's key/value head
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # L [batch, heads, q_len, k_len]
    logits = torch.einsum("hj,bjqk->bhqk", logit_mixing.to(logits.dtype), logits)
    if is_causal:
        attn_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    if attn_mask is not None:
        logits = (logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else logits + attn_mask.to(logits.dtype))
    # the softmax in at least float32 (bf16/fp16 logits), as the fused kernels do
    weights = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
    weights = torch.einsum("hj,bjqk->bhqk", weight_mixing.to(weights.dtype), weights)
    if dropout > 0:
        weights = F.dropout(weights, p=dropout)
    return torch.matmul(weights, v)


def mix_heads(attn: torch.Tensor, head_gates: Optional[torch.Tensor],
              head_mixing: Optional[torch.Tensor]) -> torch.Tensor:
    """Apply the head routing to per-head outputs ``attn [batch, seq, heads, d_v]``: the mixing
    matrix ``M [batch, seq, heads, heads]`` (gates and inter-head flow) when there is one, else the
    gates ``[batch, seq, heads]``, else nothing (dense attention)."""
    if head_mixing is not None:
        return torch.matmul(head_mixing.to(attn.dtype), attn)
    if head_gates is not None:
        return attn * head_gates.to(attn.dtype).unsqueeze(-1)
    return attn


def attention_mask(q: torch.Tensor, total: int, causal: bool, mask: Optional[torch.Tensor],
                   self_attention: bool, sliding_window: Optional[int] = None,
                   score_bias: Optional[nn.Module] = None,
                   bias: Optional[torch.Tensor] = None) -> Tuple[Optional[torch.Tensor], bool]:
    """SDPA's ``(attn_mask, is_causal)`` for queries ``q [batch, heads, seq, d]`` over ``total`` keys.

    Keys are the newest ``total`` positions, ending at the last query (every cache returns them
    so), so masks are written in positions relative to them: a query at ``i`` may see key ``j``
    when ``j <= i`` (``causal``), ``i - j < sliding_window`` (self-attention only) and ``mask``
    allows it (bool, broadcastable to ``[batch, heads, seq, total]``; a mask longer than
    ``total`` is cut to its newest columns, as a sliding-window cache drops the oldest keys).
    ``score_bias(distance [seq, total])`` (ALiBi) and ``bias`` (additive scores broadcastable to
    ``[batch, heads, seq, total]``, e.g. T5's relative bias) make the mask a float bias with
    ``-inf`` where not allowed. With nothing but plain causality SDPA's own causal kernel is used.
    """
    seq = q.shape[2]
    if mask is not None and mask.shape[-1] > total:
        mask = mask[..., -total:]
    window = sliding_window if self_attention and sliding_window is not None and sliding_window < total else None
    score_bias = score_bias if self_attention else None
    if mask is None and window is None and score_bias is None and bias is None:
        if not causal or seq == 1:
            return None, False
        if seq == total:
            return None, True  # SDPA's own causal kernel
    # new queries sit at the end of the cached sequence: positions are bottom-right aligned
    query_pos = torch.arange(total - seq, total, device=q.device)[:, None]
    key_pos = torch.arange(total, device=q.device)[None, :]
    allowed = key_pos <= query_pos if causal else None
    if window is not None:  # Mistral: key_pos > query_pos - W
        within = query_pos - key_pos < window
        allowed = within if allowed is None else allowed & within
    if mask is not None:
        allowed = mask if allowed is None else mask & allowed
        if self_attention:  # a padding query sees itself: no row is all -inf (NaN in SDPA)
            allowed = allowed | (key_pos == query_pos)
    if score_bias is not None:
        alibi = score_bias(query_pos - key_pos)  # [heads, seq, total]
        bias = alibi if bias is None else bias + alibi
    if bias is None:
        return allowed, False
    bias = bias.to(q.dtype)
    return (bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))), False
