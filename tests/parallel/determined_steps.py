"""Optimizer steps that two runs with float32-equal gradients must take alike, and the tolerance
their weights must then agree to.

A parallel run and one process compute the same gradients up to float32 rounding, in another order.
AdamW's update ``lr * m / (sqrt(v) + eps)`` with the usual ``eps = 1e-8`` divides each entry by its
own scale: a gradient entry that is rounding noise around 0 moves its weight by up to ``lr``, in a
direction the machine's kernels pick. Weights after a few such steps are not determined by the
arithmetic, only the gradients are. So the parallel tests compare gradients before the optimizer,
and compare weights after AdamW steps taken with ``eps = ADAM_EPS = 1``, where the update is
Lipschitz in the gradient (the same optimizer, the same moments to save and shard, only better
conditioned):

with ``|g| <= M`` entrywise (the gradients are clipped to a total norm ``M``) and two gradient
histories that differ by at most ``G`` per entry, the bias-corrected ``m`` is a weighted mean of the
``g`` (weights summing to 1), so ``|m| <= M`` and ``|dm| <= G``; ``s = sqrt(v)`` is a weighted RMS of
the ``g``, so ``s >= 0`` and ``|ds| <= G``. Hence

    |d(m / (s + eps))| <= |dm| / eps + |m| |ds| / eps^2 <= (G / eps) (1 + M / eps)

per step, times that step's ``lr`` (AdamW's decoupled decay multiplies a difference by
``1 - lr * wd <= 1``). Over ``steps`` steps of ``lr_t <= lr`` the weights differ by at most
``steps * lr * (G / eps) (1 + M / eps)`` (:func:`weight_atol`), plus the float32 rounding of each
run's two weight updates per step, ``2 * 2 * steps`` half-ulps relative to the weight
(:func:`weight_rtol`). The bound takes every gradient difference as rounding; the gradients of the
later steps are also taken at weights that differ by the bound itself, a second-order term that
``SAFETY`` covers.
"""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

from gohgraph.training import optim, trainer

ADAM_EPS = 1.0
# the gradients of the parallel runs and of one process agree to this per entry: asserted at every
# step by the tests that compare gradients (test_*_parallel.py's "grads"), on the same models
GRAD_ATOL = 1e-5
SAFETY = 2.0
FLOAT32_HALF_ULP = 2.0 ** -24


def weight_atol(steps: int, lr: float, max_grad: float, grad_atol: float = GRAD_ATOL, eps: float = ADAM_EPS) -> float:
    """Largest difference of two runs' weights after ``steps`` AdamW steps (``eps``) of learning
    rate at most ``lr`` on gradients clipped to ``max_grad`` that agree to ``grad_atol``."""
    return SAFETY * steps * lr * (grad_atol / eps) * (1.0 + max_grad / eps)


def weight_rtol(steps: int) -> float:
    """Float32 rounding: each of two runs rounds each weight twice per step (decay, update)."""
    return SAFETY * 2 * 2 * steps * FLOAT32_HALF_ULP


@contextlib.contextmanager
def conditioned_adamw():
    """``train`` builds its AdamW (same parameter groups, betas, decay) with ``eps = ADAM_EPS``."""
    with mock.patch.object(trainer, "build_optimizer", functools.partial(optim.build_optimizer, eps=ADAM_EPS)):
        yield
