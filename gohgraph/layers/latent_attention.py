r"""Multi-head latent attention (MLA, DeepSeek-V2/V3; docs/decoding.md) with routed heads.

Keys and values of every head come from one small latent per token, and one RoPE key is shared by
all heads:

.. math::
    c = \mathrm{RMSNorm}(W_{DKV} x) \in \mathbb{R}^{r}, \quad
    k^R = \mathrm{RoPE}(W_{KR} x) \in \mathbb{R}^{d_R}, \quad
    k^C_h = W^{UK}_h c, \quad v_h = W^{UV}_h c,

    q_h = [q^C_h; \mathrm{RoPE}(q^R_h)] \text{ from } W_Q x
    \text{ (or } W_{UQ}\,\mathrm{RMSNorm}(W_{DQ} x) \text{ with } q\_lora\_rank), \quad
    \mathrm{score}_{h}(i, j) = (q^C_{h,i} \cdot k^C_{h,j} + q^R_{h,i} \cdot k^R_j) / \sqrt{d_C + d_R}

so a decode cache holds only ``c`` and ``k^R``: ``kv_lora_rank + qk_rope_head_dim`` numbers per
token and layer, against ``2 H_kv d_h`` for MHA/GQA. The **absorbed** path never expands the
cache: since :math:`q^C_h \cdot W^{UK}_h c = (W^{UK\top}_h q^C_h) \cdot c`, each head's query is
moved into the latent space, attends over ``[c; k^R]`` with ``c`` as the value, and
:math:`W^{UV}_h` is applied to the ``r``-wide result. Both paths compute the same function;
``absorb=None`` (the default) takes the absorbed one when decoding from a cache outside training.

Head routing is :class:`~gohgraph.layers.attention.GoHAttention`'s: the routers read each head's
pre-RoPE query ``[q^C_h; q^R_h]`` and the gates (and inter-head flow) act on the heads' outputs.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GoHConfig
from ..routing import LayerRouting
from .attention import attention_mask
from .head_sparse import head_sparse_attention, picks_head_sparse
from .kv_cache import KVCache
from .linear import make_linear
from .positions import build_query_key_positions

# DeepSeek-V2/V3 build their two latent RMSNorms with this eps, not the model's rms_norm_eps
LATENT_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    """MLA self-attention with routed heads; the call signature is
    :class:`~gohgraph.layers.attention.GoHAttention`'s (no cross-attention: ``memory`` is refused).

    Projections: ``q_proj [H (d_C + d_R), d]`` (or ``q_down [r_q, d]``, ``q_norm``,
    ``q_up [H (d_C + d_R), r_q]``), ``kv_down [r + d_R, d]``, ``kv_norm``, ``kv_up [H (d_C + d_v), r]``,
    ``out [d, H d_v]``. A cache given to :meth:`forward` stores ``c [batch, 1, len, r]`` as its keys
    and ``k^R [batch, 1, len, d_R]`` as its values.

    Shapes: ``x [batch, seq, d_model]`` -> ``y [batch, seq, d_model]`` and a :class:`LayerRouting`.
    """

    def __init__(self, cfg: GoHConfig, layer_idx: int,
                 build_head_routing: Optional[Callable[[GoHConfig], nn.Module]] = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.rank = cfg.n_heads, cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.value_dim = cfg.mla_nope_dim, cfg.qk_rope_head_dim, cfg.value_head_dim
        self.query_dim = self.nope_dim + self.rope_dim
        self.scale = 1.0 / math.sqrt(self.query_dim)
        self.dropout, self.sliding_window = cfg.dropout, cfg.sliding_window
        self.absorb: Optional[bool] = None
        bias = cfg.linear_bias
        self.q_proj = self.q_down = self.q_norm = self.q_up = None
        if cfg.q_lora_rank is None:
            self.q_proj = make_linear(cfg, cfg.d_model, self.n_heads * self.query_dim)
        else:
            self.q_down = make_linear(cfg, cfg.d_model, cfg.q_lora_rank, bias=bias)
            self.q_norm = nn.RMSNorm(cfg.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_up = make_linear(cfg, cfg.q_lora_rank, self.n_heads * self.query_dim)
        self.kv_down = make_linear(cfg, cfg.d_model, self.rank + self.rope_dim, bias=bias)
        self.kv_norm = nn.RMSNorm(self.rank, eps=LATENT_NORM_EPS)
        self.kv_up = make_linear(cfg, self.rank, self.n_heads * (self.nope_dim + self.value_dim))
        self.out = make_linear(cfg, self.n_heads * self.value_dim, cfg.d_model, bias=bias)
        for linear in (self.q_proj, self.q_down, self.q_up, self.kv_down, self.kv_up):
            if linear is not None:
                nn.init.normal_(linear.weight, std=cfg.init_std)
        nn.init.normal_(self.out.weight, std=cfg.output_init_std)
        for linear in (self.q_down, self.kv_down, self.out):
            if linear is not None and linear.bias is not None:
                nn.init.zeros_(linear.bias)
        self.rotary = build_query_key_positions(cfg)
        self.head_routing = build_head_routing(cfg) if build_head_routing is not None else None
        self.n_shared_heads, self.head_execution = cfg.n_shared_heads, cfg.head_execution

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, causal: bool = True,
                mask: Optional[torch.Tensor] = None, memory: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None,
                memory_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                bias: Optional[torch.Tensor] = None,
                token_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, LayerRouting]:
        if memory is not None or memory_kv is not None:
            raise ValueError("attention='mla' is self-attention only: its keys come from the latent of x")
        batch, seq, _ = x.shape
        q = self._queries(x).view(batch, seq, self.n_heads, self.query_dim)
        if self.head_routing is not None:
            head_gates, head_mixing, routing = self.head_routing(x, q, token_mask)
        else:
            head_gates = head_mixing = None
            routing = LayerRouting(head_gates=x.new_ones(batch, seq, self.n_heads))

        latent, key_rope = self.kv_down(x).split([self.rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent).unsqueeze(1)  # [batch, 1, seq, r]
        q_nope, q_rope = q.transpose(1, 2).split([self.nope_dim, self.rope_dim], dim=-1)
        offset = cache.length(self.layer_idx) if cache is not None else 0
        q_rope, key_rope = self.rotary(q_rope, key_rope.unsqueeze(1), offset if positions is None else positions)
        if cache is not None:
            latent, key_rope = cache.append(self.layer_idx, latent, key_rope)
        attn_mask, is_causal = attention_mask(q_nope, latent.shape[2], causal, mask, True, self.sliding_window,
                                              bias=bias)
        absorb = self.absorb if self.absorb is not None else (cache is not None and not self.training)
        attend = self._attend_absorbed if absorb else self._attend_expanded
        active = None
        if self.head_routing is not None and picks_head_sparse(
                self.head_execution, head_gates, seq, latent.shape[2], dropout=self.dropout if self.training else 0.0):
            active = head_gates != 0
        causal_keys = causal and not (cache is not None and cache.returns_all_slots)
        attn = attend(q_nope, q_rope, latent, key_rope, attn_mask, is_causal, active, causal_keys)  # [batch, heads, seq, d_v]

        attn = attn.transpose(1, 2)
        if self.head_routing is not None:
            attn = self.head_routing.mix(attn, head_gates, head_mixing)
        y = self.out(attn.reshape(batch, seq, self.n_heads * self.value_dim))
        return y, routing

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_proj is not None:
            return self.q_proj(x)
        return self.q_up(self.q_norm(self.q_down(x)))

    def _attend_expanded(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor,
                         key_rope: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
                         active: Optional[torch.Tensor] = None, causal_keys: bool = True) -> torch.Tensor:
        """Expand every cached latent into per-head keys and values, then attend (training path)."""
        batch, _, length, _ = latent.shape
        kv = self.kv_up(latent.squeeze(1)).view(batch, length, self.n_heads, self.nope_dim + self.value_dim)
        key_nope, value = kv.transpose(1, 2).split([self.nope_dim, self.value_dim], dim=-1)
        key = torch.cat([key_nope, key_rope.expand(-1, self.n_heads, -1, -1)], dim=-1)
        query = torch.cat([q_nope, q_rope], dim=-1)
        return self._sdpa(query, key, value, attn_mask, is_causal, active, causal_keys)

    def _attend_absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor,
                         key_rope: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
                         active: Optional[torch.Tensor] = None, causal_keys: bool = True) -> torch.Tensor:
        """Attend in the latent space: ``W^UK`` folded into the queries, ``W^UV`` applied after."""
        up = self.kv_up.weight.view(self.n_heads, self.nope_dim + self.value_dim, self.rank)
        up_key, up_value = up.split([self.nope_dim, self.value_dim], dim=1)  # [heads, d_C | d_v, r]
        query = torch.cat([torch.matmul(q_nope, up_key), q_rope], dim=-1)  # [batch, heads, seq, r + d_R]
        key = torch.cat([latent, key_rope], dim=-1)  # [batch, 1, len, r + d_R]: one "kv head"
        out = self._sdpa(query, key, latent, attn_mask, is_causal, active, causal_keys)  # [batch, heads, seq, r]: one "kv head"
        return torch.matmul(out, up_value.transpose(1, 2))

    def _sdpa(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor],
              is_causal: bool, active: Optional[torch.Tensor], causal_keys: bool) -> torch.Tensor:
        """SDPA over every head, or head-sparse over the ``active [batch, seq, heads]`` pairs (docs/skipping-work.md)."""
        if active is not None:
            return head_sparse_attention(query, key, value, active, self.n_shared_heads, attn_mask, is_causal,
                                         causal_keys=causal_keys, scale=self.scale)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                              dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
                                              enable_gqa=key.shape[1] != query.shape[1])
