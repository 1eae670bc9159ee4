"""Position encodings, chosen by ``cfg.position_embedding`` from :data:`POSITION_SCHEMES`.

A scheme says where it acts: ``"queries_keys"`` schemes (RoPE, with its context-extension
scalings) are applied by every attention layer to its queries and keys; ``"scores"`` schemes
(ALiBi) add a bias to every attention layer's scores; ``"embedding"`` schemes (GPT-2's learned
table) are added once to the token embeddings by the model. Adding a scheme is an entry here, not
a change to the attention or the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

from ..config import GoHConfig
from .relative_bias import SinusoidalPositionEmbedding, T5RelativeBias

ON_QUERIES_KEYS, ON_SCORES, ON_EMBEDDING = "queries_keys", "scores", "embedding"
# added to the attention scores; built once per stack by the encoder / seq2seq models (T5)
ON_ATTENTION_BIAS = "attention_bias"


Positions = Union[int, torch.Tensor]


def rope_inverse_frequencies(cfg: GoHConfig) -> torch.Tensor:
    r"""RoPE's ``cfg.rope_dim / 2`` angular frequencies :math:`\omega_i = \theta^{-2i/d}`, scaled for
    longer contexts by ``cfg.rope_scaling`` with factor :math:`s`:

    * ``"linear"`` (position interpolation, Chen et al. 2023): :math:`\omega_i / s`, i.e. every
      position divided by :math:`s`;
    * ``"ntk"`` (NTK-aware): :math:`\theta \to \theta\, s^{d/(d-2)}`: the lowest frequency is
      divided by :math:`s`, the highest kept;
    * ``"llama3"`` (Llama-3.1's ``rope_scaling``, as Hugging Face computes it): with wavelength
      :math:`\lambda_i = 2\pi/\omega_i` and original context :math:`L`, frequencies with
      :math:`\lambda_i > L/\text{low}` are divided by :math:`s`, those with
      :math:`\lambda_i < L/\text{high}` kept, and between them
      :math:`(1-\gamma)\,\omega_i/s + \gamma\,\omega_i` with
      :math:`\gamma = (L/\lambda_i - \text{low})/(\text{high} - \text{low})`.

    Returns ``[cfg.rope_dim / 2]`` float32 (``rope_dim`` is ``head_dim``, or MLA's ``qk_rope_head_dim``).
    """
    dim, theta, factor = cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling_factor
    if cfg.rope_scaling == "ntk":
        theta = theta * factor ** (dim / (dim - 2))
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    if cfg.rope_scaling == "linear":
        return inv_freq / factor
    if cfg.rope_scaling == "llama3":
        low, high, original = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_seq_len
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        ramp = (original / wavelength - low) / (high - low)
        smoothed = (1 - ramp) * scaled / factor + ramp * scaled
        between = (wavelength >= original / high) & (wavelength <= original / low)
        return torch.where(between, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """RoPE in the rotate-half convention (LLaMA / Hugging Face).

    ``rotate(x [batch, heads, seq, head_dim], positions)`` rotates the token at position ``p`` by
    the angles ``p * omega_i`` (``inv_freq``: :func:`rope_inverse_frequencies`). ``positions`` is an
    ``int`` offset (token ``t`` sits at ``offset + t``) or a ``[batch, seq]`` tensor (left-padded
    batches, where each row counts its own positions from its first real token).
    """

    def __init__(self, inv_freq: torch.Tensor, max_seq_len: int) -> None:
        super().__init__()
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


class AlibiBias(nn.Module):
    r"""ALiBi (Press et al. 2022): no position embedding; head :math:`h` adds
    :math:`-m_h\,|i - j|` to the score of query :math:`i` and key :math:`j`.

    Slopes :math:`m_h = 2^{-8h/n}` for :math:`h = 1..n` when ``n`` heads is a power of two; otherwise
    the ``2^⌊log2 n⌋`` slopes of that power followed by every other slope of twice it (the paper's
    rule). ``forward(distance [q, k])`` (query position minus key position) -> ``[heads, q, k]``.
    """

    def __init__(self, cfg: GoHConfig) -> None:
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(cfg.n_heads), persistent=False)

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        return -self.slopes[:, None, None] * distance.abs().float()


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """``[n_heads]`` ALiBi slopes (see :class:`AlibiBias`)."""
    def power_of_two(n: int) -> list:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    below = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = power_of_two(below) + power_of_two(2 * below)[0::2][:n_heads - below]
    return torch.tensor(slopes, dtype=torch.float32)


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
    "rope": PositionScheme(lambda cfg: RotaryEmbedding(rope_inverse_frequencies(cfg), cfg.max_seq_len),
                           ON_QUERIES_KEYS),
    "alibi": PositionScheme(AlibiBias, ON_SCORES),
    "learned": PositionScheme(LearnedPositionEmbedding, ON_EMBEDDING),
    "sinusoidal": PositionScheme(SinusoidalPositionEmbedding, ON_EMBEDDING),
    # bidirectional buckets by default (encoders); a decoder stack builds T5RelativeBias(cfg, False)
    "t5-relative": PositionScheme(lambda cfg: T5RelativeBias(cfg, bidirectional=True), ON_ATTENTION_BIAS),
}


def build_query_key_positions(cfg: GoHConfig) -> Optional[nn.Module]:
    """The module an attention layer applies to ``(q, k, offset)``, or ``None`` for this scheme."""
    scheme = POSITION_SCHEMES[cfg.position_embedding]
    return scheme.build(cfg) if scheme.acts_on == ON_QUERIES_KEYS else None


def build_score_positions(cfg: GoHConfig) -> Optional[nn.Module]:
    """The module an attention layer calls with ``distance [q, k]`` for a score bias, or ``None``."""
    scheme = POSITION_SCHEMES[cfg.position_embedding]
    return scheme.build(cfg) if scheme.acts_on == ON_SCORES else None


def has_attention_bias(cfg: GoHConfig) -> bool:
    """Whether ``cfg.position_embedding`` is a bias on the attention scores (built by the model)."""
    return POSITION_SCHEMES[cfg.position_embedding].acts_on == ON_ATTENTION_BIAS


def build_embedding_positions(cfg: GoHConfig) -> Optional[nn.Module]:
    """The module the model applies to ``(embeddings, offset)``, or ``None`` for this scheme."""
    scheme = POSITION_SCHEMES[cfg.position_embedding]
    return scheme.build(cfg) if scheme.acts_on == ON_EMBEDDING else None
