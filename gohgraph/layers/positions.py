"""Position encodings, chosen by ``cfg.position_embedding`` from :data:`POSITION_SCHEMES`.

A scheme says where it acts: ``"queries_keys"`` schemes (RoPE) are applied by every attention
layer to its queries and keys; ``"embedding"`` schemes (GPT-2's learned table) are added once to
the token embeddings by the model. Adding a scheme (sinusoidal, ALiBi, RoPE scaling) is an entry
here, not a change to the attention or the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

from ..config import GoHConfig
from .relative_bias import SinusoidalPositionEmbedding, T5RelativeBias

ON_QUERIES_KEYS, ON_EMBEDDING = "queries_keys", "embedding"
# added to the attention scores; built once per stack by the encoder / seq2seq models (T5)
ON_ATTENTION_BIAS = "attention_bias"


Positions = Union[int, torch.Tensor]


class RotaryEmbedding(nn.Module):
    """RoPE in the rotate-half convention (LLaMA / Hugging Face).

    ``rotate(x [batch, heads, seq, head_dim], positions)`` rotates the token at position ``p`` by
    the angles ``p * theta^(-2i/head_dim)``. ``positions`` is an ``int`` offset (token ``t`` sits at
    ``offset + t``) or a ``[batch, seq]`` tensor (left-padded batches, where each row counts its own
    positions from its first real token).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # [max_seq_len, head_dim]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def rotate(self, x: torch.Tensor, positions: Positions) -> torch.Tensor:
        cos, sin = _rows(self.cos, positions, x.shape[-2]), _rows(self.sin, positions, x.shape[-2])
        if cos.dim() == 3:  # [batch, seq, head_dim]: one angle per row, shared by the heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        first, second = x.chunk(2, dim=-1)
        return x * cos.to(x.dtype) + torch.cat([-second, first], dim=-1) * sin.to(x.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: Positions):
        """Rotate queries and keys ``[batch, heads, seq, head_dim]`` at ``positions``."""
        return self.rotate(q, positions), self.rotate(k, positions)


class LearnedPositionEmbedding(nn.Module):
    """GPT-2's absolute position table ``weight [max_seq_len, d_model]``.

    ``forward(x [batch, seq, d_model], positions)`` returns ``x`` plus the table's rows at
    ``positions`` (an ``int`` offset or a ``[batch, seq]`` tensor, as for :class:`RotaryEmbedding`).
    """

    def __init__(self, cfg: GoHConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.max_seq_len, cfg.d_model))
        nn.init.normal_(self.weight, std=cfg.init_std)

    def forward(self, x: torch.Tensor, positions: Positions) -> torch.Tensor:
        return x + _rows(self.weight, positions, x.shape[1])


def _rows(table: torch.Tensor, positions: Positions, seq: int) -> torch.Tensor:
    """``table[offset:offset + seq]`` (``[seq, ...]``) or ``table[positions]`` (``[batch, seq, ...]``)."""
    if isinstance(positions, int):
        if positions + seq > table.shape[0]:
            raise ValueError(f"position {positions + seq} exceeds max_seq_len={table.shape[0]}")
        return table[positions:positions + seq]
    return table[positions]


@dataclass(frozen=True)
class PositionScheme:
    """How to build a position module from the config, and where it acts (``ON_*``)."""

    build: Callable[[GoHConfig], nn.Module]
    acts_on: str


POSITION_SCHEMES: Dict[str, PositionScheme] = {
    "rope": PositionScheme(lambda cfg: RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta),
                           ON_QUERIES_KEYS),
    "learned": PositionScheme(LearnedPositionEmbedding, ON_EMBEDDING),
    "sinusoidal": PositionScheme(SinusoidalPositionEmbedding, ON_EMBEDDING),
    # bidirectional buckets by default (encoders); a decoder stack builds T5RelativeBias(cfg, False)
    "t5-relative": PositionScheme(lambda cfg: T5RelativeBias(cfg, bidirectional=True), ON_ATTENTION_BIAS),
}


def build_query_key_positions(cfg: GoHConfig) -> Optional[nn.Module]:
    """The module an attention layer applies to ``(q, k, offset)``, or ``None`` for this scheme."""
    scheme = POSITION_SCHEMES[cfg.position_embedding]
    return scheme.build(cfg) if scheme.acts_on == ON_QUERIES_KEYS else None


def has_attention_bias(cfg: GoHConfig) -> bool:
    """Whether ``cfg.position_embedding`` is a bias on the attention scores (built by the model)."""
    return POSITION_SCHEMES[cfg.position_embedding].acts_on == ON_ATTENTION_BIAS


def build_embedding_positions(cfg: GoHConfig) -> Optional[nn.Module]:
    """The module the model applies to ``(embeddings, offset)``, or ``None`` for this scheme."""
    scheme = POSITION_SCHEMES[cfg.position_embedding]
    return scheme.build(cfg) if scheme.acts_on == ON_EMBEDDING else None
