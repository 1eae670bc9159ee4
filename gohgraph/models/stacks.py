"""What every stack of blocks over embedded tokens shares: positions, T5's relative bias, an
embedding norm, dropout, the blocks, and the final norm.

:class:`~gohgraph.models.encoder.EncoderStack` (an encoder's, and a seq2seq model's source side)
and :class:`~gohgraph.models.seq2seq.DecoderStack` (a seq2seq model's target side) are
:class:`LayerStack` s: they differ in their blocks and in how they call them (masks, memory), not in
what surrounds the blocks. The submodules keep the names every checkpoint stores
(``position_embed``, ``relative_bias``, ``embedding_norm``, ``blocks``, ``final_norm``) and are
built in that order, so a seed draws the same weights as before the stacks shared this class.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from ..config import GoHConfig
from ..layers.norm import build_norm
from ..layers.positions import build_embedding_positions, has_attention_bias
from ..layers.relative_bias import T5RelativeBias


class LayerStack(nn.Module):
    """Positions, ``depth`` blocks built by ``make_block(cfg, layer_idx)``, and the final norm.

    A subclass's ``forward`` reads ``x, bias = self.enter(x, offset)``, runs ``self.blocks`` its
    own way, and returns ``self.leave(x)``. ``bidirectional``: whether T5's relative buckets tell
    keys after the query from keys before it (an encoder) or only look back (a causal decoder).
    """

    def __init__(self, cfg: GoHConfig, make_block: Callable[[GoHConfig, int], nn.Module], depth: int,
                 bidirectional: bool) -> None:
        super().__init__()
        self.position_embed = build_embedding_positions(cfg)
        # T5: one bias table for the whole stack, added to every self-attention layer's scores
        # (a decoder's cross-attention has none)
        self.relative_bias = T5RelativeBias(cfg, bidirectional=bidirectional) if has_attention_bias(cfg) else None
        self.embedding_norm = build_norm(cfg) if cfg.embedding_norm else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(make_block(cfg, i) for i in range(depth))
        # post-norm blocks end normalised already (BERT and Vaswani have no final norm)
        self.final_norm = build_norm(cfg) if cfg.norm_position == "pre" else None

    def enter(self, x: torch.Tensor, offset: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Embedded tokens ``x [batch, seq, d_model]`` at positions ``offset ..`` (after ``offset``
        cached ones) -> the blocks' input ``[batch, seq, d_model]`` and the relative-position bias
        ``[1, heads, seq, offset + seq]`` (``None`` without T5's bias)."""
        if self.position_embed is not None:
            x = self.position_embed(x, offset)
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        x = self.dropout(x)
        seq = x.shape[1]
        bias = self.relative_bias(seq, offset + seq, offset) if self.relative_bias is not None else None
        return x, bias

    def leave(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output ``[batch, seq, d_model]`` through the final norm (when there is one)."""
        return self.final_norm(x) if self.final_norm is not None else x
