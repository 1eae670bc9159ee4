"""Every projection of the model comes from :func:`make_linear`: the one place to swap its kind.

Attention, dense FFNs, MH-MoE's head and merge layers, shared experts and the untied output head
are built here, so a different linear (BitNet b1.58's ternary BitLinear, DESIGN.md §13) replaces
all of them by adding an entry to :data:`LINEAR_KINDS` (and a config field that names it; ``cfg``
is passed for that). Routers stay plain ``nn.Linear``: they
route in float32 (DESIGN.md §10) and are never quantised.
"""

from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from ..config import GoHConfig

LinearFactory = Callable[[int, int, bool], nn.Module]

# kind -> factory(d_in, d_out, bias) returning a module with ``weight [d_out, d_in]`` (and ``bias``)
LINEAR_KINDS: Dict[str, LinearFactory] = {
    "standard": lambda d_in, d_out, bias: nn.Linear(d_in, d_out, bias=bias),
}
DEFAULT_LINEAR = "standard"


def make_linear(cfg: GoHConfig, d_in: int, d_out: int, bias: bool = False) -> nn.Module:
    """A projection ``[..., d_in] -> [..., d_out]`` of the kind ``cfg`` selects.

    The caller initialises the weights (each layer knows its own std), exactly as it would an
    ``nn.Linear``: the module has ``weight [d_out, d_in]`` and ``bias [d_out]`` or ``None``.
    """
    return LINEAR_KINDS[DEFAULT_LINEAR](d_in, d_out, bias)
