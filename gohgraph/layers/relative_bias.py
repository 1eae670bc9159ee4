r"""Position schemes of the encoder–decoder family (docs/decoding.md): Vaswani's sinusoids and T5's
bucketed relative-position bias.

* :class:`SinusoidalPositionEmbedding` is added once to the token embeddings (``"embedding"``
  scheme): :math:`PE_{p, 2i} = \sin(p / 10000^{2i/d})`, :math:`PE_{p, 2i+1} = \cos(p / 10000^{2i/d})`.
  No parameters.
* :class:`T5RelativeBias` is an ``"attention_bias"`` scheme: one learned scalar per (bucket, head)
  added to the attention scores of every self-attention layer of a stack (T5 computes it in the
  first layer and shares it). The model builds one per stack: bidirectional buckets for the
  encoder, causal (past-only) buckets for the decoder.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import nn

from ..config import GoHConfig


class SinusoidalPositionEmbedding(nn.Module):
    """Vaswani et al.'s fixed sinusoids ``[max_seq_len, d_model]`` (a non-persistent buffer).

    ``forward(x [batch, seq, d_model], positions)`` returns ``x + PE[positions]`` (``positions`` an
    ``int`` offset or a ``[batch, seq]`` tensor, as for the learned table).
    """

    def __init__(self, cfg: GoHConfig) -> None:
        super().__init__()
        position = torch.arange(cfg.max_seq_len, dtype=torch.float32)[:, None]
        inv_freq = torch.exp(torch.arange(0, cfg.d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / cfg.d_model))
        table = torch.zeros(cfg.max_seq_len, cfg.d_model)
        table[:, 0::2] = torch.sin(position * inv_freq)
        table[:, 1::2] = torch.cos(position * inv_freq)[:, :cfg.d_model // 2]
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: torch.Tensor, positions: Union[int, torch.Tensor]) -> torch.Tensor:
        if isinstance(positions, int):
            if positions + x.shape[1] > self.table.shape[0]:
                raise ValueError(f"position {positions + x.shape[1]} exceeds max_seq_len={self.table.shape[0]}")
            return x + self.table[positions:positions + x.shape[1]].to(x.dtype)
        return x + self.table[positions].to(x.dtype)


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, n_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucket of each ``key - query`` offset (any shape, int64 in, int64 out).

    Bidirectional: half the buckets for keys after the query. Within a direction, offsets below
    ``n/2`` get a bucket each; larger ones share logarithmically spaced buckets up to
    ``max_distance``, beyond which everything is the last bucket. Causal buckets see only the past
    (a future offset counts as 0; the causal mask hides it anyway).
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        n_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * n_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = n_buckets // 2
    is_small = distance < max_exact
    # clamp(min=1) keeps log finite for the small offsets, which take the other branch anyway
    log_bucket = max_exact + (torch.log(distance.clamp(min=1).float() / max_exact)
                              / math.log(max_distance / max_exact) * (n_buckets - max_exact)).long()
    log_bucket = torch.clamp(log_bucket, max=n_buckets - 1)
    return buckets + torch.where(is_small, distance, log_bucket)


class T5RelativeBias(nn.Module):
    """T5's relative-position bias: ``weight [relative_buckets, n_heads]``, one scalar per bucket and head.

    ``forward(q_len, k_len, offset=0)`` -> ``[1, heads, q_len, k_len]``: query ``t`` sits at
    ``offset + t`` (after a cache), key ``s`` at ``s``.
    """

    def __init__(self, cfg: GoHConfig, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.n_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.weight = nn.Parameter(torch.empty(cfg.relative_buckets, cfg.n_heads))
        nn.init.normal_(self.weight, std=cfg.init_std)

    def forward(self, q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
        device = self.weight.device
        query = torch.arange(offset, offset + q_len, device=device)[:, None]
        key = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(key - query, self.bidirectional, self.n_buckets, self.max_distance)
        return self.weight[buckets].permute(2, 0, 1).unsqueeze(0)
