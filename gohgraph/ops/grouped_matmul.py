"""Grouped matmul over expert-contiguous rows: ``rows [R, d_in]`` x ``weights [E, d_in, d_out]``.

``torch.nn.functional.grouped_mm`` runs it as one kernel (forward and backward, CPU float32 and CUDA
bf16 in torch 2.13). Where it cannot run (float64, widths whose rows are not 16-byte aligned) a loop
over per-expert views (``split`` + ``unbind``: no full-size gradient per expert)
computes the same thing; :func:`looped_matmul` is also the reference the tests compare with.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_matmul(rows: torch.Tensor, weights: torch.Tensor, group_offsets: torch.Tensor) -> torch.Tensor:
    """``rows [R, d_in]`` (expert-contiguous), ``weights [E, d_in, d_out]`` -> ``[R, d_out]``.

    ``group_offsets[-1]`` must equal ``R``: ``grouped_mm`` leaves rows past the last offset
    undefined, so dispatch never hands it any.
    """
    weights = weights.to(rows.dtype)  # under autocast the rows may already be bf16
    if _grouped_mm_supported(rows, weights):
        out = F.grouped_mm(rows.contiguous(), weights, offs=group_offsets)
        # grouped_mm's backward rejects non-contiguous incoming gradients
        return _ContiguousGrad.apply(out)
    return looped_matmul(rows, weights, group_offsets)


def _grouped_mm_supported(rows: torch.Tensor, weights: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or rows.dtype not in GROUPED_MM_DTYPES:
        return False
    # every row stride must be a multiple of 16 bytes
    return all((width * rows.element_size()) % 16 == 0 for width in (rows.shape[-1], weights.shape[-1]))


def looped_matmul(rows: torch.Tensor, weights: torch.Tensor, group_offsets: torch.Tensor) -> torch.Tensor:
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


def routed_matmul(rows: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                  row_index: torch.Tensor, out_index: torch.Tensor, n_out: int) -> torch.Tensor:
    r"""Dropless sort -> grouped matmul -> gate-weighted scatter-add, for ``A`` assignments:

    .. math:: \mathrm{out}[o_a] \mathrel{+}= g_a \, \mathrm{rows}[r_a] \, W_{e_a}

    Only the chosen ``(row, expert)`` products are computed (docs/experts.md; the MoE layer's dispatch
    adds capacity and expert parallelism on top of the same three steps).

    Args:
        rows: ``[R, d_in]``.
        weights: ``[E, d_in, d_out]``.
        expert_ids, gates, row_index, out_index: ``[A]`` each: the expert of every assignment, its
            gate, the row it reads and the output row it adds into.
        n_out: rows of the result.
    Returns:
        ``[n_out, d_out]``.
    """
    order = torch.argsort(expert_ids, stable=True)
    group_sizes = torch.bincount(expert_ids, minlength=weights.shape[0])
    grouped = rows.index_select(0, row_index.index_select(0, order))
    out = grouped_matmul(grouped, weights, torch.cumsum(group_sizes, dim=0).to(torch.int32))
    out = out * gates.index_select(0, order).to(out.dtype).unsqueeze(-1)
    return out.new_zeros(n_out, out.shape[-1]).index_add_(0, out_index.index_select(0, order), out)
