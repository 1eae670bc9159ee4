"""GoH attention: multi-head attention whose heads are routed per token over a head graph.

``router="dense"`` is exactly standard MHA/GQA/MQA, ``router="linear"`` is MoH and
``router="graph"`` is GoH (DESIGN.md §3): one class, three configurations.

Compute honesty: every head's attention is computed and inactive heads are multiplied by a zero
gate. Head sparsity saves no FLOPs in this implementation; what it changes is the function the
layer computes (and what a kernel that skips heads could save later).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import GoHConfig
from .graph import head_graph
from .router import HeadGate, HeadRouter, LinearHeadRouter
from .routing import LayerRouting


class KVCache:
    """Keys and values of the positions seen so far, one entry per layer.

    A small object with an append/read interface so that another cache (e.g. a compressed latent
    cache for MLA) can replace it without touching the attention code.
    Shapes: keys and values ``[batch, kv_heads, seq, head_dim]``.
    """

    def __init__(self, n_layers: int) -> None:
        self.keys: List[Optional[torch.Tensor]] = [None] * n_layers
        self.values: List[Optional[torch.Tensor]] = [None] * n_layers

    def length(self, layer: int = 0) -> int:
        keys = self.keys[layer]
        return 0 if keys is None else keys.shape[2]

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions' keys/values; return everything cached for ``layer``."""
        if self.keys[layer] is not None:
            keys = torch.cat([self.keys[layer], keys], dim=2)
            values = torch.cat([self.values[layer], values], dim=2)
        self.keys[layer], self.values[layer] = keys, values
        return keys, values


class RotaryEmbedding(nn.Module):
    """RoPE in the rotate-half convention (LLaMA / Hugging Face), applied to ``[batch, heads, seq, head_dim]``."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # [max_seq_len, head_dim]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        seq = x.shape[-2]
        if offset + seq > self.cos.shape[0]:
            raise ValueError(f"position {offset + seq} exceeds max_seq_len={self.cos.shape[0]}")
        cos = self.cos[offset:offset + seq].to(x.dtype)
        sin = self.sin[offset:offset + seq].to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-second, first], dim=-1) * sin


class GoHAttention(nn.Module):
    """Causal (or bidirectional) self-attention with routed heads and inter-head flow.

    Steps (DESIGN.md §3): q/k/v projections (GQA when ``n_kv_heads < n_heads``); the router reads
    the pre-RoPE per-head queries (GoH; with ``router_token_logits`` plus MoH's linear logits of the
    token) or the token (MoH) and gives head logits; :class:`HeadGate`
    turns them into gates ``g [batch, seq, heads]``; RoPE and SDPA per head; inter-head flow
    ``o'_i = o_i + γ_i Σ_{j→i, j active} β_ji o_j`` with ``β`` the router's last-round edge
    attention and ``γ`` a learned per-head scale initialised to 0 (so a fresh GoH layer starts as
    MoH); output ``y = Σ_i g_i W_O^i o'_i``.

    Shapes: ``x [batch, seq, d_model]`` -> ``y [batch, seq, d_model]`` and a :class:`LayerRouting`
    with the attention fields filled.
    """

    def __init__(self, cfg: GoHConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.router_kind = layer_idx, cfg.router
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.linear_bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.linear_bias)
        nn.init.normal_(self.qkv.weight, std=cfg.init_std)
        nn.init.normal_(self.out.weight, std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)
        for linear in (self.qkv, self.out):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        # learned absolute positions (GPT-2) are added to the embedding by the model instead
        self.rotary = (RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
                       if cfg.position_embedding == "rope" else None)

        self.router: Optional[nn.Module] = None
        self.flow_scale: Optional[nn.Parameter] = None
        self.token_router: Optional[nn.Module] = None
        if cfg.router == "graph":
            edge_index = head_graph(cfg.head_graph, cfg.n_heads)
            self.router = HeadRouter(cfg.head_dim, cfg.n_heads, edge_index, cfg.router_dim,
                                     cfg.router_rounds, cfg.init_std)
            if cfg.inter_head_flow and edge_index.shape[1] > 0:
                self.flow_scale = nn.Parameter(torch.zeros(cfg.n_heads))
            if cfg.router_token_logits:
                self.token_router = LinearHeadRouter(cfg.d_model, cfg.n_heads, cfg.init_std)
        elif cfg.router == "linear":
            self.router = LinearHeadRouter(cfg.d_model, cfg.n_heads, cfg.init_std)
        self.gate = HeadGate(cfg) if self.router is not None else None

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None,
                causal: bool = True) -> Tuple[torch.Tensor, LayerRouting]:
        batch, seq, d_model = x.shape
        heads, kv_heads, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q = q.view(batch, seq, heads, head_dim)
        head_gates, head_mixing, routing = self._route(x, q)

        offset = cache.length(self.layer_idx) if cache is not None else 0
        q = q.transpose(1, 2)
        k = k.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        v = v.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)
        attn = self._attend(q, k, v, offset, causal)  # [batch, heads, seq, head_dim]

        attn = attn.transpose(1, 2)  # [batch, seq, heads, head_dim]
        if head_mixing is not None:
            attn = torch.matmul(head_mixing.to(attn.dtype), attn)
        elif head_gates is not None:
            attn = attn * head_gates.to(attn.dtype).unsqueeze(-1)
        y = self.out(attn.reshape(batch, seq, d_model))
        return y, routing

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int,
                causal: bool) -> torch.Tensor:
        seq, total = q.shape[2], k.shape[2]
        mask, is_causal = None, False
        if causal and seq > 1:
            if offset == 0:
                is_causal = True
            else:  # new queries sit at the end of the cached sequence: bottom-right causal mask
                query_pos = torch.arange(offset, offset + seq, device=q.device)[:, None]
                mask = torch.arange(total, device=q.device)[None, :] <= query_pos
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads)

    def _route(self, x: torch.Tensor, q: torch.Tensor
               ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], LayerRouting]:
        """Head gates ``[batch, seq, heads]`` and, with flow, the per-token head-mixing matrix.

        With flow, ``y_i = g_i (o_i + Σ_j M_ij o_j) = (diag(g) (I + M) o)_i``: one small batched
        matmul by ``[batch, seq, heads, heads]`` applies gates and flow together. Without flow the
        gates are a plain multiply; the dense router returns neither (nothing to apply).
        """
        batch, seq, heads, _ = q.shape
        if self.router is None:
            return None, None, LayerRouting(head_gates=x.new_ones(batch, seq, heads))
        tokens_x = x.reshape(batch * seq, -1)
        edge_weights = None
        if self.router_kind == "graph":
            logits, edge_weights = self.router(q.reshape(batch * seq, heads, -1),
                                               dense_weights=self.flow_scale is not None)
            if self.token_router is not None:
                logits = logits + self.token_router(tokens_x)
        else:
            logits = self.router(tokens_x)
        gating = self.gate(tokens_x, logits)
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
            aux_losses=gating.aux_losses,
        )
        return gates.view(batch, seq, heads), mixing, routing
