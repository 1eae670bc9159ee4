r"""BitNet b1.58's BitLinear (Ma et al. 2024, "The Era of 1-bit LLMs"), and its parts for stacked experts.

A BitLinear keeps a **latent full-precision weight** :math:`W` (what the optimizer updates) and
computes, on every call, in training and in evaluation alike:

.. math::
    \hat x = \mathrm{RMSNorm}(x), \quad
    x_q = \mathrm{clamp}\big(\mathrm{round}(127\,\hat x / \max_j|\hat x_j|), -128, 127\big)
        \cdot \max_j|\hat x_j| / 127 \ \text{(per token)}, \\
    \gamma = \mathrm{mean}|W|, \quad W_q = \mathrm{clamp}(\mathrm{round}(W/\gamma), -1, 1)\,\gamma, \quad
    y = x_q W_q^\top (+ b)

with straight-through gradients for both roundings (:func:`~gohgraph.ops.ternary.straight_through`),
so gradients reach :math:`W`. The parameter-free RMSNorm before the activation quantiser is the
released recipe's (the BitNet FAQ's BitLinear builds a fresh ``LlamaRMSNorm``, i.e. unit gain and
eps 1e-6, on every call). Biases, when a config asks for them, stay full precision.

The matmul here runs on the dequantised values in floating point (a simulation of the integer
kernel: the same numbers, since ``x_q W_q^T = (q_x q_W^T) \gamma_x \gamma / 127`` with an exact integer
``q_x q_W^T``); ``tests/layers/test_bitlinear.py`` checks it against that integer computation.

:class:`TernaryWeights` is what :mod:`gohgraph.models.packed` looks for to write weights as 2-bit
codes plus their scales, and to load them back.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.ternary import INT8_LEVELS, absmax_int8, absmean_ternary, expand_scale, straight_through

BITNET_NORM_EPS = 1e-6  # LlamaRMSNorm's default, as BitNet's released BitLinear uses it


def quantise_activations(x: torch.Tensor) -> torch.Tensor:
    """``x [..., d]`` -> its parameter-free RMSNorm, int8-quantised per token (dequantised values,
    straight-through gradient). The int8 codes are ``round(result * 127 / max|result|)``."""
    normed = F.rms_norm(x, (x.shape[-1],), eps=BITNET_NORM_EPS)
    q, gamma = absmax_int8(normed)
    return straight_through(normed, q * (gamma / INT8_LEVELS))


class TernaryWeights:
    """A module some of whose weights are ternary in the forward: :attr:`ternary_dims` names them
    with the dims their absmean scale is taken over (``()`` = the whole matrix, ``(1, 2)`` = one
    scale per expert of ``[E, d_in, d_out]``).

    A model loaded from packed ternary weights (:mod:`gohgraph.models.packed`) has no latent
    weights left: :meth:`load_ternary` sets the weight to ``q * gamma`` and pins ``gamma``, so the
    forward computes exactly what the saved model computed (recomputing ``mean|q gamma|`` would give
    ``gamma`` times the fraction of non-zero codes instead). Pinned scales are not part of the
    ``state_dict``: save such a model packed again.
    """

    ternary_dims: Dict[str, Tuple[int, ...]] = {}

    def _init_pinned_scales(self) -> None:
        for name in self.ternary_dims:
            self.register_buffer(_pinned(name), None, persistent=False)

    def ternary(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Codes (float32, ``{-1, 0, 1}``) and scale (float32, ``[]`` or ``[E]``) of weight ``name``."""
        weight = getattr(self, name)
        pinned: Optional[torch.Tensor] = getattr(self, _pinned(name))
        if pinned is None:
            return absmean_ternary(weight, self.ternary_dims[name])
        return (weight.float() / expand_scale(pinned, weight)).round().clamp(-1, 1), pinned

    def quantised_weight(self, name: str) -> torch.Tensor:
        """Weight ``name`` as ``q * gamma`` forward, straight-through to the latent weight backward."""
        weight = getattr(self, name)
        q, gamma = self.ternary(name)
        return straight_through(weight, q * expand_scale(gamma, q))

    @torch.no_grad()
    def load_ternary(self, name: str, q: torch.Tensor, gamma: torch.Tensor) -> None:
        weight = getattr(self, name)
        gamma = gamma.to(device=weight.device, dtype=torch.float32)
        weight.copy_(q.to(weight.device) * expand_scale(gamma, q))
        setattr(self, _pinned(name), gamma)


def _pinned(name: str) -> str:
    return f"{name}_pinned_scale"


class BitLinear(nn.Linear, TernaryWeights):
    """``nn.Linear`` with BitNet b1.58's ternary weights and int8 activations (module docstring).

    Shapes: ``x [..., in_features]`` -> ``[..., out_features]``; ``weight [out, in]`` is the latent
    full-precision weight, initialised and loaded like an ``nn.Linear``'s.
    """

    ternary_dims = {"weight": ()}

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self._init_pinned_scales()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = quantise_activations(x)
        w_q = self.quantised_weight("weight").to(x_q.dtype)
        return F.linear(x_q, w_q, None if self.bias is None else self.bias.to(x_q.dtype))
