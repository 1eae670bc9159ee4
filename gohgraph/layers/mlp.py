"""Dense feed-forward MLPs: SwiGLU (LLaMA, the default) and GPT-2's GELU MLP.

Both map ``[..., d_model] -> [..., d_model]`` through :func:`~gohgraph.layers.linear.make_linear`
projections; the feed-forward layer that picks dense or expert FFNs is
:func:`gohgraph.moe.layer.build_feed_forward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GoHConfig
from .linear import make_linear


class SwiGLU(nn.Module):
    """``W_down (SiLU(W_gate x) * W_up x)``; shapes ``[..., d_model] -> [..., d_model]``.

    ``gate_up`` holds ``W_gate`` and ``W_up`` stacked (one matmul); ``down`` is initialised with
    ``cfg.output_init_std`` since it writes into the residual stream.
    """

    def __init__(self, cfg: GoHConfig, hidden: int) -> None:
        super().__init__()
        self.gate_up = make_linear(cfg, cfg.d_model, 2 * hidden, bias=cfg.linear_bias)
        self.down = make_linear(cfg, hidden, cfg.d_model, bias=cfg.linear_bias)
        nn.init.normal_(self.gate_up.weight, std=cfg.init_std)
        nn.init.normal_(self.down.weight, std=cfg.output_init_std)
        _zero_biases(self.gate_up, self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """GPT-2's MLP ``W_proj GELU_tanh(W_fc x)``; shapes ``[..., d_model] -> [..., d_model]``.

    The tanh approximation is GPT-2's ``gelu_new``, so converted GPT-2 weights compute the same function.
    """

    def __init__(self, cfg: GoHConfig, hidden: int) -> None:
        super().__init__()
        self.fc = make_linear(cfg, cfg.d_model, hidden, bias=cfg.linear_bias)
        self.proj = make_linear(cfg, hidden, cfg.d_model, bias=cfg.linear_bias)
        nn.init.normal_(self.fc.weight, std=cfg.init_std)
        nn.init.normal_(self.proj.weight, std=cfg.output_init_std)
        _zero_biases(self.fc, self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def build_mlp(cfg: GoHConfig) -> nn.Module:
    """The dense MLP ``cfg.mlp`` names, ``cfg.hidden_dim`` wide."""
    mlp_class = GeluMLP if cfg.mlp == "gelu" else SwiGLU
    return mlp_class(cfg, cfg.hidden_dim)


def _zero_biases(*linears: nn.Module) -> None:
    for linear in linears:
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
