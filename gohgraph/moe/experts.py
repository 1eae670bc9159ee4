"""What experts do with the sub-tokens they receive: SwiGLU (default) or GELU MLPs, many at once.

:class:`GroupedExperts` holds the routed experts' weights stacked as ``[E, d_in, d_out]`` and runs
them over expert-contiguous rows (from :mod:`gohgraph.moe.dispatch`) with one grouped matmul per
projection (:func:`gohgraph.ops.grouped_matmul.grouped_matmul`), so the cost follows the number of
*rows*, not the number of experts. :class:`BitNetGroupedExperts` are the same experts with
BitNet b1.58's ternary weights (one absmean scale per expert) and int8 activations per row.
:class:`SharedExperts` are the always-on experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GoHConfig
from ..layers.bitlinear import TernaryWeights, quantise_activations
from ..layers.linear import make_linear
from ..ops.grouped_matmul import grouped_matmul


class GroupedExperts(nn.Module):
    r"""``E`` expert MLPs applied to expert-sorted rows.

    SwiGLU: :math:`y = W^{out}_e(\mathrm{SiLU}(x W^{gate}_e) \odot x W^{up}_e)`;
    GELU: :math:`y = W^{out}_e \mathrm{GELU}(x W^{in}_e)`. No biases, like the dense FFN.

    Weights: ``w_in [E, d_model, 2 * hidden]`` (gate columns first, then up; ``hidden`` columns for
    GELU) and ``w_out [E, hidden, d_model]``.

    Shapes: ``grouped [rows, d_model]`` with expert ``e`` owning rows
    ``group_offsets[e-1]:group_offsets[e]``, ``group_offsets [E]`` int32 -> ``[rows, d_model]``.
    """

    def __init__(self, n_experts: int, d_model: int, hidden: int, activation: str,
                 init_std: float, out_std: float) -> None:
        super().__init__()
        self.n_experts, self.d_model, self.hidden, self.activation = n_experts, d_model, hidden, activation
        in_width = 2 * hidden if activation == "swiglu" else hidden
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, in_width))
        self.w_out = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.init_std, self.out_std = init_std, out_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in, std=self.init_std)
        nn.init.normal_(self.w_out, std=self.out_std)

    def forward(self, grouped: torch.Tensor, group_offsets: torch.Tensor) -> torch.Tensor:
        hidden = grouped_matmul(grouped, self.w_in, group_offsets)
        if self.activation == "swiglu":
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden)
        return grouped_matmul(hidden, self.w_out, group_offsets)

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, d_model={self.d_model}, hidden={self.hidden}, activation={self.activation}"


class BitNetGroupedExperts(GroupedExperts, TernaryWeights):
    r""":class:`GroupedExperts` whose every projection is a BitLinear (``cfg.linear="bitnet"``).

    Each expert's matrix is quantised on its own, exactly as a BitLinear quantises its one matrix:
    :math:`\gamma_e = \mathrm{mean}|W_e|`, :math:`W_{q,e} = \mathrm{clamp}(\mathrm{round}(W_e/\gamma_e), -1, 1)\,\gamma_e`;
    the rows (one per sub-token assignment) are RMS-normalised and int8-quantised per row before
    each grouped matmul (:func:`~gohgraph.layers.bitlinear.quantise_activations`). Latent weights
    are full precision; the gradients reach them straight through both roundings.
    """

    ternary_dims = {"w_in": (1, 2), "w_out": (1, 2)}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_pinned_scales()

    def forward(self, grouped: torch.Tensor, group_offsets: torch.Tensor) -> torch.Tensor:
        rows = quantise_activations(grouped)
        hidden = grouped_matmul(rows, self.quantised_weight("w_in"), group_offsets)
        if self.activation == "swiglu":
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden)
        return grouped_matmul(quantise_activations(hidden), self.quantised_weight("w_out"), group_offsets)


class SharedExperts(nn.Module):
    r"""``cfg.n_shared_experts`` always-on experts of width ``hidden``, summed with weight 1 each.

    The sum of ``n`` independent MLPs equals one MLP whose hidden layer is their concatenation,
    so they run as a single dense MLP of width ``n * hidden`` (same parameters, one matmul), or
    ``cfg.shared_expert_hidden`` wide. With ``cfg.shared_expert_gate`` the output is multiplied by
    :math:`\sigma(w^\top x)` per token (Qwen2-MoE's shared-expert gate).
    Shapes: ``[..., d_model] -> [..., d_model]``.
    """

    def __init__(self, cfg: GoHConfig, d_model: int, hidden: int) -> None:
        super().__init__()
        self.activation = cfg.expert_activation
        width = cfg.shared_expert_hidden or cfg.n_shared_experts * hidden
        self.w_in = make_linear(cfg, d_model, 2 * width if self.activation == "swiglu" else width, bias=False)
        self.w_out = make_linear(cfg, width, d_model, bias=False)
        nn.init.normal_(self.w_in.weight, std=cfg.init_std)
        nn.init.normal_(self.w_out.weight, std=cfg.output_init_std)
        self.output_gate = None
        if cfg.shared_expert_gate:
            self.output_gate = nn.Linear(d_model, 1, bias=False)  # a router: never quantised
            nn.init.normal_(self.output_gate.weight, std=cfg.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.w_in(x)
        if self.activation == "swiglu":
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden)
        out = self.w_out(hidden)
        return out if self.output_gate is None else out * torch.sigmoid(self.output_gate(x))
