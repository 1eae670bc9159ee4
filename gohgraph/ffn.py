"""Feed-forward layers: the dense SwiGLU FFN and the factory that picks dense or expert layers.

Every feed-forward layer maps ``x [batch, seq, d_model]`` to ``(y [batch, seq, d_model],
ExpertRouting | None)``; the expert layers live in :mod:`gohgraph.moe`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import GoHConfig


@dataclass
class ExpertRouting:
    """Expert decisions of one layer; copied into :class:`~gohgraph.routing.LayerRouting`.

    ``expert_indices`` / ``expert_weights``: ``[batch, seq, subtokens, top_k_experts]``;
    ``dropped``: ``[batch, seq, subtokens]`` bool; ``expert_drops``:
    ``[batch, seq, subtokens, top_k_experts]`` bool; ``aux_losses``: unweighted scalar losses.
    """

    expert_indices: torch.Tensor
    expert_weights: torch.Tensor
    dropped: Optional[torch.Tensor] = None
    expert_drops: Optional[torch.Tensor] = None
    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)


class SwiGLU(nn.Module):
    """``W_down (SiLU(W_gate x) * W_up x)``; shapes ``[..., d_model] -> [..., d_model]``."""

    def __init__(self, d_model: int, hidden: int, init_std: float, out_std: float) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        nn.init.normal_(self.gate_up.weight, std=init_std)
        nn.init.normal_(self.down.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DenseFeedForward(nn.Module):
    """The dense FFN as a feed-forward layer (no experts, so no routing record)."""

    def __init__(self, cfg: GoHConfig) -> None:
        super().__init__()
        self.mlp = SwiGLU(cfg.d_model, cfg.hidden_dim, cfg.init_std, cfg.init_std / (2 * cfg.n_layers) ** 0.5)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[ExpertRouting]]:
        return self.mlp(x), None


def build_feed_forward(cfg: GoHConfig, layer_idx: int) -> nn.Module:
    """The feed-forward layer ``cfg.ffn`` names."""
    if cfg.ffn == "dense":
        return DenseFeedForward(cfg)
    from .moe import MoEFeedForward  # experts only load when asked for

    return MoEFeedForward(cfg, layer_idx)
