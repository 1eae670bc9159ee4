"""One transformer block: routed attention, then a dense or expert feed-forward layer."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..config import GoHConfig
from ..layers.attention import GoHAttention
from ..layers.kv_cache import KVCache
from ..layers.latent_attention import LatentAttention
from ..layers.norm import build_norm
from ..moe.layer import build_feed_forward
from ..routers.heads import HeadRouting
from ..routing import LayerRouting


def build_attention(cfg: GoHConfig, layer_idx: int) -> nn.Module:
    """Attention of the kind ``cfg.attention`` names (MHA/GQA/MQA, or MLA) with the head routing
    ``cfg.router`` names (none for ``"dense"``)."""
    attention = LatentAttention if cfg.attention == "mla" else GoHAttention
    return attention(cfg, layer_idx, HeadRouting if cfg.router != "dense" else None)


class GoHBlock(nn.Module):
    """Pre-norm block ``x + attn(norm(x))`` then ``x + ffn(norm(x))``; ``x [batch, seq, d_model]``.

    ``cfg.norm_position="post"`` is Vaswani's and BERT's ``norm(x + attn(x))`` then ``norm(x + ffn(x))``.

    :func:`build_attention` builds the head routing (none for ``router="dense"``) and hands it to
    the attention; an expert FFN's :class:`~gohgraph.routing.ExpertRouting` is attached to the
    attention's record as ``record.experts``. Causality and masks are arguments of the call, not
    part of the block, so encoders reuse it. ``token_mask [batch, seq]`` bool (``False``: padding)
    reaches every router of the block: padding then takes no expert compute or capacity and adds
    nothing to a routing loss or a balancing count (``None``: every token is real).
    """

    def __init__(self, cfg: GoHConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = build_norm(cfg)
        self.attn = build_attention(cfg, layer_idx)
        self.ffn_norm = build_norm(cfg)
        self.ffn = build_feed_forward(cfg, layer_idx)
        self.dropout = nn.Dropout(cfg.dropout)
        self.post_norm = cfg.norm_position == "post"

    def residual(self, x: torch.Tensor, norm: nn.Module, sublayer) -> Tuple[torch.Tensor, object]:
        """``x + sublayer(norm(x))`` (pre-norm) or ``norm(x + sublayer(x))`` (post-norm), and the
        sublayer's record; ``sublayer(h) -> (out, record)``."""
        out, record = sublayer(x if self.post_norm else norm(x))
        x = x + self.dropout(out)
        return (norm(x) if self.post_norm else x), record

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, causal: bool = True,
                mask: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None,
                token_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, LayerRouting]:
        x, routing = self.residual(x, self.attn_norm, lambda h: self.attn(
            h, cache=cache, causal=causal, mask=mask, positions=positions, bias=bias, token_mask=token_mask))
        x, routing.experts = self.residual(x, self.ffn_norm, lambda h: self.ffn(h, token_mask))
        return x, routing
