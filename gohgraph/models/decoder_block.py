"""The decoder block of the encoder–decoder model (Vaswani; T5): causal self-attention,
cross-attention over the encoder output, then a dense or expert FFN."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..config import GoHConfig
from ..layers.kv_cache import KVCache
from ..layers.norm import build_norm
from ..routing import LayerRouting
from .block import GoHBlock, build_attention


class DecoderBlock(GoHBlock):
    r""":class:`GoHBlock` with a cross-attention sub-layer between its self-attention and its FFN.

    Pre-norm (T5): :math:`x \mathrel{+}= \mathrm{SelfAttn}(\mathrm{norm}(x))`, then
    :math:`x \mathrel{+}= \mathrm{CrossAttn}(\mathrm{norm}(x), m)`, then
    :math:`x \mathrel{+}= \mathrm{FFN}(\mathrm{norm}(x))`; ``cfg.norm_position="post"`` (Vaswani)
    puts each norm after its residual sum instead. The cross-attention's queries come from the
    decoder state ``x [batch, tgt, d_model]``, its keys and values from the encoder output ``m``,
    given already projected (``memory_kv``: :meth:`GoHAttention.project_memory` of this block's
    ``cross_attn``, each ``[batch, kv_heads, src, head_dim]``) so that a decoding loop projects
    them once; its heads are routed by its own router reading the decoder token and query, as in
    self-attention. ``memory_mask`` (bool ``[batch, 1, 1, src]``) hides encoder padding;
    ``token_mask [batch, tgt]`` bool marks target padding (``False``) for every router of the block.

    Returns ``(x [batch, tgt, d_model], self_routing, cross_routing)``; an expert FFN's record is
    attached to ``self_routing.experts``, as :class:`GoHBlock` does.
    """

    def __init__(self, cfg: GoHConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        self.cross_norm = build_norm(cfg)
        self.cross_attn = build_attention(cfg, layer_idx)

    def forward(self, x: torch.Tensor, memory_kv: Tuple[torch.Tensor, torch.Tensor],
                memory_mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                mask: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                token_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, LayerRouting, LayerRouting]:
        x, self_routing = self.residual(x, self.attn_norm, lambda h: self.attn(
            h, cache=cache, causal=True, mask=mask, bias=bias, token_mask=token_mask))
        # T5's cross-attention has no position bias; the memory's keys carry no rotary positions
        x, cross_routing = self.residual(x, self.cross_norm, lambda h: self.cross_attn(
            h, causal=False, mask=memory_mask, memory_kv=memory_kv, token_mask=token_mask))
        x, self_routing.experts = self.residual(x, self.ffn_norm, lambda h: self.ffn(h, token_mask))
        return x, self_routing, cross_routing
