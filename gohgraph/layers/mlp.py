"""Dense feed-forward MLPs, chosen by ``cfg.mlp``: SwiGLU (LLaMA, the default), GeGLU (T5 v1.1) and
two-layer MLPs with GELU-tanh (GPT-2), exact GELU (BERT) or ReLU (Vaswani, T5 v1.0).

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


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class SwiGLU(nn.Module):
    """``W_down (SiLU(W_gate x) * W_up x)``; shapes ``[..., d_model] -> [..., d_model]``; with
    ``activation`` GELU-tanh it is GeGLU (T5 v1.1).

    ``gate_up`` holds ``W_gate`` and ``W_up`` stacked (one matmul); ``down`` is initialised with
    ``cfg.output_init_std`` since it writes into the residual stream.
    """

    def __init__(self, cfg: GoHConfig, hidden: int, activation=F.silu) -> None:
        super().__init__()
        self.activation = activation
        self.gate_up = make_linear(cfg, cfg.d_model, 2 * hidden, bias=cfg.linear_bias)
        self.down = make_linear(cfg, hidden, cfg.d_model, bias=cfg.linear_bias)
        nn.init.normal_(self.gate_up.weight, std=cfg.init_std)
        nn.init.normal_(self.down.weight, std=cfg.output_init_std)
        _zero_biases(self.gate_up, self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.activation(gate) * up)


class GeluMLP(nn.Module):
    """A two-layer MLP ``W_proj act(W_fc x)``; shapes ``[..., d_model] -> [..., d_model]``.

    ``act`` is GELU-tanh by default, GPT-2's ``gelu_new``, so converted GPT-2 weights compute the same
    function; BERT's exact (erf) GELU and Vaswani's ReLU are the same module with another ``activation``.
    """

    def __init__(self, cfg: GoHConfig, hidden: int, activation=_gelu_tanh) -> None:
        super().__init__()
        self.activation = activation
        self.fc = make_linear(cfg, cfg.d_model, hidden, bias=cfg.linear_bias)
        self.proj = make_linear(cfg, hidden, cfg.d_model, bias=cfg.linear_bias)
        nn.init.normal_(self.fc.weight, std=cfg.init_std)
        nn.init.normal_(self.proj.weight, std=cfg.output_init_std)
        _zero_biases(self.fc, self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.activation(self.fc(x)))


# cfg.mlp -> (module, activation); parameter names stay those of SwiGLU / GeluMLP, so checkpoints of
# either kind load whatever the activation
MLP_BUILDERS = {
    "swiglu": (SwiGLU, F.silu),
    "geglu": (SwiGLU, _gelu_tanh),  # T5 v1.1's gated-gelu (its "gelu_new" is the tanh form)
    "gelu": (GeluMLP, _gelu_tanh),
    "gelu-exact": (GeluMLP, F.gelu),
    "relu": (GeluMLP, F.relu),
}


def build_mlp(cfg: GoHConfig) -> nn.Module:
    """The dense MLP ``cfg.mlp`` names, ``cfg.hidden_dim`` wide."""
    mlp_class, activation = MLP_BUILDERS[cfg.mlp]
    return mlp_class(cfg, cfg.hidden_dim, activation)


def _zero_biases(*linears: nn.Module) -> None:
    for linear in linears:
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
