"""What experts do with the sub-tokens they receive: SwiGLU (default) or GELU MLPs, many at once.

:class:`GroupedExperts` holds the routed experts' weights stacked as ``[E, d_in, d_out]`` and runs
them over expert-contiguous rows (from :func:`gohgraph.dispatch.dispatch`) with one grouped matmul
per projection, ``torch.nn.functional.grouped_mm``, so the cost follows the number of *rows*, not
the number of experts. Where ``grouped_mm`` cannot run (float64, widths whose rows are not 16-byte
aligned) a loop over per-expert views (``split`` + ``unbind``: no full-size gradient per expert)
computes the same thing. :class:`SharedExperts` are the always-on experts.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


class SharedExperts(nn.Module):
    """``n_shared`` always-on experts of width ``hidden``, summed with weight 1 each.

    The sum of ``n`` independent MLPs equals one MLP whose hidden layer is their concatenation,
    so they run as a single dense MLP of width ``n * hidden`` (same parameters, one matmul).
    Shapes: ``[..., d_model] -> [..., d_model]``.
    """

    def __init__(self, n_shared: int, d_model: int, hidden: int, activation: str,
                 init_std: float, out_std: float) -> None:
        super().__init__()
        self.activation = activation
        width = n_shared * hidden
        self.w_in = nn.Linear(d_model, 2 * width if activation == "swiglu" else width, bias=False)
        self.w_out = nn.Linear(width, d_model, bias=False)
        nn.init.normal_(self.w_in.weight, std=init_std)
        nn.init.normal_(self.w_out.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.w_in(x)
        if self.activation == "swiglu":
            gate, up = hidden.chunk(2, dim=-1)
            return self.w_out(F.silu(gate) * up)
        return self.w_out(F.gelu(hidden))


# ---------------------------------------------------------------------- grouped matmul
def grouped_matmul(rows: torch.Tensor, weights: torch.Tensor, group_offsets: torch.Tensor) -> torch.Tensor:
    """``rows [R, d_in]`` (expert-contiguous), ``weights [E, d_in, d_out]`` -> ``[R, d_out]``.

    ``group_offsets[-1]`` must equal ``R``: ``grouped_mm`` leaves rows past the last offset
    undefined, so dispatch never hands it any.
    """
    weights = weights.to(rows.dtype)  # under autocast the rows may already be bf16
    if _grouped_mm_supported(rows, weights):
        out = F.grouped_mm(rows.contiguous(), weights, offs=group_offsets)
        # grouped_mm's backward rejects non-contiguous incoming gradients (DESIGN.md §10)
        return _ContiguousGrad.apply(out)
    return _looped_matmul(rows, weights, group_offsets)


def _grouped_mm_supported(rows: torch.Tensor, weights: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or rows.dtype not in GROUPED_MM_DTYPES:
        return False
    # every row stride must be a multiple of 16 bytes
    return all((width * rows.element_size()) % 16 == 0 for width in (rows.shape[-1], weights.shape[-1]))


def _looped_matmul(rows: torch.Tensor, weights: torch.Tensor, group_offsets: torch.Tensor) -> torch.Tensor:
    sizes = torch.diff(group_offsets.long(), prepend=group_offsets.new_zeros(1).long()).tolist()
    pieces: List[torch.Tensor] = [chunk @ w for chunk, w in zip(rows.split(sizes), weights.unbind(0))]
    return torch.cat(pieces, dim=0)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()
