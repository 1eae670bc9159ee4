"""Feed-forward layers: the dense SwiGLU FFN (or GPT-2's GELU MLP) and the factory that picks dense or expert layers.

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

    def __init__(self, d_model: int, hidden: int, init_std: float, out_std: float, bias: bool = False) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        nn.init.normal_(self.gate_up.weight, std=init_std)
        nn.init.normal_(self.down.weight, std=out_std)
        _zero_biases(self.gate_up, self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """GPT-2's MLP ``W_proj GELU_tanh(W_fc x)``; shapes ``[..., d_model] -> [..., d_model]``.

    The tanh approximation is GPT-2's ``gelu_new``, so converted GPT-2 weights compute the same function.
    """

    def __init__(self, d_model: int, hidden: int, init_std: float, out_std: float, bias: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, hidden, bias=bias)
        self.proj = nn.Linear(hidden, d_model, bias=bias)
        nn.init.normal_(self.fc.weight, std=init_std)
        nn.init.normal_(self.proj.weight, std=out_std)
        _zero_biases(self.fc, self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def _zero_biases(*linears: nn.Linear) -> None:
    for linear in linears:
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)


class DenseFeedForward(nn.Module):
    """The dense FFN as a feed-forward layer (no experts, so no routing record)."""

    def __init__(self, cfg: GoHConfig) -> None:
        super().__init__()
        mlp_class = GeluMLP if cfg.mlp == "gelu" else SwiGLU
        self.mlp = mlp_class(cfg.d_model, cfg.hidden_dim, cfg.init_std, cfg.init_std / (2 * cfg.n_layers) ** 0.5,
                             bias=cfg.linear_bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[ExpertRouting]]:
        return self.mlp(x), None


def build_feed_forward(cfg: GoHConfig, layer_idx: int) -> nn.Module:
    """The feed-forward layer ``cfg.ffn`` names."""
    if cfg.ffn == "dense":
        return DenseFeedForward(cfg)
    from .moe import MoEFeedForward  # experts only load when asked for

    return MoEFeedForward(cfg, layer_idx)
