"""Schedules as pure functions of the step, so resuming a run needs no scheduler object.

* :func:`learning_rate`: linear warmup, then cosine decay to ``min_lr_ratio * lr``;
* :func:`dense_to_sparse_schedule`: the dense blend that anneals a converted dense model into a
  routed one (MoH's continue-tuning), 1.0 at step 0 down to 0.0;
* :func:`recursion_capacity_warmup`: Mixture-of-Recursions' capacity warm-up, 1.0 at step 0 down
  to 0.0 along a half cosine.
"""

from __future__ import annotations

import math

import torch


def learning_rate(step: int, base_lr: float, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def dense_to_sparse_schedule(step: int, warmup_steps: int) -> float:
    """Dense blend for training step ``step``: 1.0 at step 0, falling linearly to 0.0 at ``warmup_steps``.

    ``warmup_steps = 0`` switches to sparse routing at once. Use with
    :meth:`GoHTransformer.set_dense_blend` before each optimizer step.
    """
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
    if step >= warmup_steps:
        return 0.0
    return 1.0 - step / warmup_steps


def recursion_capacity_warmup(step: int, warmup_steps: int) -> float:
    """Warm-up share for step ``step``: ``0.5 (1 + cos(pi min(1, step / warmup_steps)))``, 1.0 at
    step 0 and 0.0 from ``warmup_steps`` on (the MoR reference code's ``cap_warmup_step``). Use
    with :meth:`GoHTransformer.set_recursion_capacity_warmup` before each optimizer step."""
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step={step} and warmup_steps={warmup_steps} must be >= 0")
    if warmup_steps == 0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / warmup_steps)))
