r"""BitNet b1.58's quantisers (Ma et al. 2024) and the 2-bit packing of ternary weights.

* :func:`absmean_ternary` - weights to :math:`\{-1, 0, +1\} \cdot \gamma` with
  :math:`\gamma = \mathrm{mean}|W|` (over the whole matrix, or per expert of a stacked tensor);
* :func:`absmax_int8` - activations to int8 per token: :math:`q = \mathrm{clamp}(\mathrm{round}(x \cdot 127 / \max|x|), -128, 127)`;
* :func:`straight_through` - the quantised value forward, the identity's gradient backward (STE);
* :func:`pack_ternary` / :func:`unpack_ternary` - four ternary weights per byte (2 bits each).

The slow references are in ``tests/ops/test_ternary.py``.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

INT8_LEVELS = 127  # absmax maps the largest |x| of a token to 127 (BitNet's Q_b = 2^(b-1) with b = 8)
INT8_MIN, INT8_MAX = -128, 127
# BitNet's released code clamps both scales' denominators at 1e-5 (an all-zero row or matrix stays 0)
QUANT_EPS = 1e-5
TERNARY_PER_BYTE = 4  # 2 bits per weight


def absmean_ternary(weight: torch.Tensor, dims: Sequence[int] = ()) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""``weight`` as ternary codes and their scale: :math:`W \approx q\,\gamma`.

    :math:`\gamma = \max(\mathrm{mean}|W|, \epsilon)` over ``dims`` (all dims when empty: one scale
    per matrix; ``(1, 2)`` for stacked experts ``[E, d_in, d_out]``: one per expert) and
    :math:`q = \mathrm{clamp}(\mathrm{round}(W / \gamma), -1, 1)`. Computed in float32.

    Returns ``q`` (float32, values in ``{-1, 0, 1}``, the shape of ``weight``) and ``gamma``
    (float32, ``[]`` or the kept dims, e.g. ``[E]``).
    """
    w = weight.float()
    dims = tuple(dims) or tuple(range(w.dim()))
    gamma = w.abs().mean(dim=dims, keepdim=True).clamp(min=QUANT_EPS)
    q = (w / gamma).round().clamp(-1, 1)
    return q, gamma.squeeze(dims) if dims else gamma


def expand_scale(gamma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-matrix ``[]`` or per-expert ``[E]`` scale shaped to broadcast over ``like``."""
    return gamma.reshape(gamma.shape + (1,) * (like.dim() - gamma.dim()))


def absmax_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Per-token int8 codes of ``x [..., d]``: :math:`x \approx q\,\gamma / 127`.

    :math:`\gamma = \max(\max_j |x_j|, \epsilon)` per token (last dim) and
    :math:`q = \mathrm{clamp}(\mathrm{round}(127\, x / \gamma), -128, 127)`. Returns ``q`` (float32
    holding integers; ``.to(torch.int8)`` is exact) and ``gamma [..., 1]`` (float32).
    """
    x = x.float()
    gamma = x.abs().amax(dim=-1, keepdim=True).clamp(min=QUANT_EPS)
    q = (x * (INT8_LEVELS / gamma)).round().clamp(INT8_MIN, INT8_MAX)
    return q, gamma


def straight_through(latent: torch.Tensor, quantised: torch.Tensor) -> torch.Tensor:
    """``quantised`` in the forward; in the backward the gradient goes to ``latent`` unchanged
    (the straight-through estimator of BitNet, Bengio et al. 2013)."""
    # quantised + 0, not latent + (quantised - latent): the forward value is exactly the quantised
    # one (no rounding of the difference), so a model rebuilt from its ternary codes matches bit for bit
    return quantised.to(latent.dtype).detach() + (latent - latent.detach())


def pack_ternary(q: torch.Tensor) -> torch.Tensor:
    """Ternary codes (any shape, values in ``{-1, 0, 1}``) -> ``uint8 [ceil(numel / 4)]``.

    Row-major order; weight ``i`` sits in byte ``i // 4`` at bits ``2 (i % 4)`` as ``q + 1``
    (0, 1 or 2); the tail of the last byte is padding (code 1, i.e. weight 0).
    """
    codes = (q.reshape(-1).round().to(torch.int64) + 1).clamp(0, 2)
    padding = (-codes.numel()) % TERNARY_PER_BYTE
    codes = torch.cat([codes, codes.new_ones(padding)]).view(-1, TERNARY_PER_BYTE)
    shifts = torch.arange(TERNARY_PER_BYTE, device=codes.device) * 2
    return (codes << shifts).sum(dim=-1).to(torch.uint8)


def unpack_ternary(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: ``uint8 [ceil(n / 4)]`` -> float32 codes of ``shape``."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-numel // TERNARY_PER_BYTE):
        raise ValueError(f"packed ternary weights must be uint8 [{-(-numel // TERNARY_PER_BYTE)}] for shape "
                         f"{list(shape)}, got {packed.dtype} {list(packed.shape)}")
    shifts = torch.arange(TERNARY_PER_BYTE, device=packed.device) * 2
    codes = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 3
    return (codes.reshape(-1)[:numel] - 1).float().reshape(tuple(shape))
