"""Grouped matmul over expert-contiguous rows: ``rows [R, d_in]`` x ``weights [E, d_in, d_out]``.

``torch.nn.functional.grouped_mm`` runs it as one kernel (forward and backward, CPU float32 and CUDA
bf16 in torch 2.13). Where it cannot run (float64, widths whose rows are not 16-byte aligned) a loop
over per-expert views (``split`` + ``unbind``: no full-size gradient per expert)
computes the same thing; :func:`looped_matmul` is also the reference the tests compare with.
:func:`routed_matmul` adds the sort before and the gate-weighted scatter after.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# where routed_matmul adds expert by expert instead of one grouped_mm (see its docstring): on these
# devices, from this many assignments per expert on average. Measured on 2 CPU cores (SwitchHead's
# 4 heads x 5 experts, 768 <-> 64): at 205 per expert the two tie in training (1.00x), at 307 the
# loop takes 0.84x the time (0.55x without gradient), at 26 or fewer (decoding) it takes 1.5-2.4x
EXPERT_BY_EXPERT_DEVICES = ("cpu",)
EXPERT_BY_EXPERT_MIN_ROWS = 256


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
    adds capacity and expert parallelism on top of the same three steps). The gate multiplies the
    narrower of the rows and the products, the same value (``(g r) W = g (r W)``) at less memory
    traffic. On CPU, with many rows per expert (:data:`EXPERT_BY_EXPERT_MIN_ROWS`), each expert's
    products are added into the result as they are made: ``grouped_mm`` there is a loop of matmuls
    anyway, and skipping its ``[A, d_out]`` intermediate made SwitchHead's attention step ~12% faster
    (d_model 768, 1,024 tokens; BENCHMARKS.md); with few (a decode step) one ``grouped_mm`` is faster.

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
    row_index, out_index = row_index.index_select(0, order), out_index.index_select(0, order)
    gates = gates.index_select(0, order).to(rows.dtype).unsqueeze(-1)
    gate_inputs = rows.shape[-1] <= weights.shape[-1]
    weights = weights.to(rows.dtype)
    if adds_expert_by_expert(rows.device, expert_ids.numel(), weights.shape[0]):
        return _expert_by_expert(rows, weights, group_sizes.tolist(), gates, row_index, out_index, n_out, gate_inputs)
    grouped = rows.index_select(0, row_index)
    if gate_inputs:
        grouped = grouped * gates
    out = grouped_matmul(grouped, weights, torch.cumsum(group_sizes, dim=0).to(torch.int32))
    if not gate_inputs:
        out = out * gates.to(out.dtype)
    return out.new_zeros(n_out, out.shape[-1]).index_add_(0, out_index, out)


def adds_expert_by_expert(device: torch.device, n_assignments: int, n_experts: int) -> bool:
    """Whether :func:`routed_matmul` runs expert by expert (else one ``grouped_mm``): on
    :data:`EXPERT_BY_EXPERT_DEVICES`, from :data:`EXPERT_BY_EXPERT_MIN_ROWS` assignments per expert."""
    return device.type in EXPERT_BY_EXPERT_DEVICES and n_assignments >= EXPERT_BY_EXPERT_MIN_ROWS * n_experts


def _expert_by_expert(rows: torch.Tensor, weights: torch.Tensor, group_sizes: List[int], gates: torch.Tensor,
                      row_index: torch.Tensor, out_index: torch.Tensor, n_out: int, gate_inputs: bool
                      ) -> torch.Tensor:
    """:func:`routed_matmul` one expert at a time, on assignments already sorted by expert."""
    out = rows.new_zeros(n_out, weights.shape[-1])
    for weight, rows_of, outs_of, gates_of in zip(weights.unbind(0), row_index.split(group_sizes),
                                                    out_index.split(group_sizes), gates.split(group_sizes)):
        if rows_of.numel() == 0:
            continue
        inputs = rows.index_select(0, rows_of)
        if gate_inputs:
            out.index_add_(0, outs_of, (inputs * gates_of) @ weight)
        else:
            out.index_add_(0, outs_of, (inputs @ weight) * gates_of)
    return out
