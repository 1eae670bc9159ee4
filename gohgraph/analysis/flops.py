"""FLOPs of a real step, counted by ``torch.utils.flop_counter.FlopCounterMode`` (docs/skipping-work.md).

The counter has no formula for two kernels this package runs on CPU, so it would count them as 0:

* ``_scaled_dot_product_flash_attention_for_cpu`` (and its backward), CPU's fused SDPA. Counted as
  the multiply-adds of the score and value products over the (query, key) pairs the kernel computes:
  every pair under a mask, and only ``key <= query`` with ``is_causal`` (the kernel skips the blocks
  above the diagonal). Backward is counted as twice the forward plus the recomputed scores
  (the same five products as torch's GPU formula).
* ``_grouped_mm`` (the expert dispatch): ``2 * rows * d_in * d_out`` summed over the groups, i.e.
  ``2 * total_rows * d_in * d_out`` for a 2-D input against a ``[groups, d_in, d_out]`` weight.

A FLOP is one multiply or one add (a multiply-add is 2), as in torch's formulas.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _attended_pairs(q_len: int, k_len: int, is_causal: bool) -> int:
    """(query, key) pairs a causal kernel computes (top-left aligned, query i sees keys <= i)."""
    if not is_causal:
        return q_len * k_len
    full_rows = max(0, q_len - k_len)  # rows past the last key see every key
    seen = min(q_len, k_len)
    return seen * (seen + 1) // 2 + full_rows * k_len


def cpu_sdpa_flops(query_shape, key_shape, value_shape, dropout_p: float = 0.0, is_causal: bool = False,
                   *args, out_shape=None, **kwargs) -> int:
    """Forward FLOPs of CPU's fused SDPA: ``2 * pairs * (d_qk + d_v)`` per (batch, query head)."""
    batch, heads, q_len, d_qk = query_shape
    d_v = value_shape[-1]
    return 2 * batch * heads * _attended_pairs(q_len, key_shape[2], bool(is_causal)) * (d_qk + d_v)


def cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, out_shape_, logsumexp_shape,
                            dropout_p: float = 0.0, is_causal: bool = False, *args, out_shape=None, **kwargs) -> int:
    """Backward FLOPs: recomputed scores, then the gradients of the two products (four products)."""
    batch, heads, q_len, d_qk = query_shape
    d_v = value_shape[-1]
    pairs = _attended_pairs(q_len, key_shape[2], bool(is_causal))
    return 2 * batch * heads * pairs * (d_qk + 2 * d_v + 2 * d_qk)


def grouped_mm_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """``x [rows, d_in]`` against ``w [groups, d_in, d_out]``: each row meets one group's matrix."""
    if len(x_shape) == 2 and len(w_shape) == 3:
        return 2 * x_shape[0] * w_shape[1] * w_shape[2]
    if len(x_shape) == 3 and len(w_shape) == 3:  # batched: [groups, rows, d_in] @ [groups, d_in, d_out]
        return 2 * x_shape[0] * x_shape[1] * x_shape[2] * w_shape[2]
    # the weight gradient: x^T [d_in, rows] against grad [rows, d_out], grouped along rows
    return 2 * x_shape[0] * x_shape[1] * w_shape[-1]


CUSTOM_FORMULAS: Dict[object, Callable] = {
    aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward_flops,
    aten._grouped_mm: grouped_mm_flops,
}


def count_flops(run: Callable[[], object]) -> Tuple[int, Dict[str, int]]:
    """FLOPs of ``run()`` (forward and, if it calls ``backward``, backward): the total and per op."""
    with FlopCounterMode(display=False, custom_mapping=CUSTOM_FORMULAS) as counter:
        run()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op
