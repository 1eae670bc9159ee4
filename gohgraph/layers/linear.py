"""Every projection of the model comes from :func:`make_linear`: the one place to swap its kind.

Attention, dense FFNs, MH-MoE's head and merge layers and the shared experts are built here, so ``cfg.linear`` swaps all of them: ``"standard"`` is ``nn.Linear``, ``"bitnet"``
BitNet b1.58's ternary :class:`~gohgraph.layers.bitlinear.BitLinear` (docs/bitnet.md). The routed
experts hold stacked weights and are not built here; :func:`ternary_experts` tells them to quantise
per expert. Routers (and the shared-expert gate) stay plain ``nn.Linear``: they route in float32
(docs/routing.md) and are never quantised. Embeddings and the output head are not projections built
here either, so they stay full precision, as in BitNet.
"""

from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from ..config import GoHConfig
from .bitlinear import BitLinear

LinearFactory = Callable[[int, int, bool], nn.Module]

# kind (``cfg.linear``) -> factory(d_in, d_out, bias) returning a module with ``weight [d_out, d_in]``
# (and ``bias``)
LINEAR_KINDS: Dict[str, LinearFactory] = {
    "standard": lambda d_in, d_out, bias: nn.Linear(d_in, d_out, bias=bias),
    "bitnet": lambda d_in, d_out, bias: BitLinear(d_in, d_out, bias=bias),
}
DEFAULT_LINEAR = "standard"
# kinds whose routed experts (stacked [E, d_in, d_out] weights, not built here) are ternary too
TERNARY_KINDS = frozenset({"bitnet"})


def make_linear(cfg: GoHConfig, d_in: int, d_out: int, bias: bool = False) -> nn.Module:
    """A projection ``[..., d_in] -> [..., d_out]`` of the kind ``cfg`` selects.

    The caller initialises the weights (each layer knows its own std), exactly as it would an
    ``nn.Linear``: the module has ``weight [d_out, d_in]`` and ``bias [d_out]`` or ``None``.
    """
    return LINEAR_KINDS[cfg.linear](d_in, d_out, bias)


def ternary_experts(cfg: GoHConfig) -> bool:
    """Whether ``cfg.linear`` quantises the routed experts' stacked weights too (BitNet: per expert)."""
    return cfg.linear in TERNARY_KINDS
