"""The training step through ``torch.compile`` (``TrainConfig.compile``, ``gohgraph train --compile``).

:class:`TrainingForward` is what the loop calls for a micro-step's forward, loss and backward.
With ``compile=False`` (the default) it is the model, eagerly. With ``compile=True`` the model's
forward is ``torch.compile(model)``; its backward is compiled by the same call (AOT autograd), and
the loss (``lm_loss + aux_scale * aux_loss``, a scalar sum) stays outside so that a changing
``aux_scale`` never recompiles. Outputs, losses and gradients equal the eager ones
(tests/training/test_compile.py).

``torch.compile`` fails lazily, at the first call, forward or backward, and possibly after part of
the step ran (a graph break runs eager code between compiled graphs). So the first compiled
micro-step runs from a snapshot of what a step can change (buffers such as the auxiliary-loss-free
load counts, gradients, the random state): if compiling fails anywhere in it, the snapshot is put
back, one warning line says why (:func:`~gohgraph.models.compile.warn_compile_unavailable`), and
the step reruns eagerly, as every later one does. A run that falls back is the run that never
compiled.

Graphs are specialised to the training shape (``[batch_size / ranks, seq_len]``, fixed) and to the
plain-number settings the model reads: a Mixture-of-Recursions capacity warm-up changes one every
step, so each warm-up step recompiles until ``torch._dynamo``'s recompile limit, after which those
calls run eagerly.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..models.compile import warn_compile_unavailable

# a micro-step: (the forward to call) -> whatever the loop needs from it (output and loss)
MicroStep = Callable[[Callable], Tuple]


class TrainingForward:
    """Runs micro-steps through the compiled forward (or the eager one, see the module docstring).

    Args:
        model: the module the loop calls (the model, or its DDP/FSDP wrapper).
        compile: wrap it with ``torch.compile``.
    Attributes:
        compiled: whether calls go through ``torch.compile`` (False after a fallback).
    """

    def __init__(self, model: nn.Module, compile: bool = False) -> None:
        self.model = model
        self.forward: Callable = model
        self.compiled = False
        self._first_call_pending = False
        if compile:
            try:
                self.forward = torch.compile(model)
                self.compiled = self._first_call_pending = True
            except Exception as err:  # torch.compile's failures have no common type
                warn_compile_unavailable(err, "training stays eager")

    def run(self, micro_step: MicroStep) -> Tuple:
        """``micro_step(forward)`` runs one forward, loss and backward with ``forward``; its result
        is returned. The first compiled one falls back to eager if compiling fails."""
        if not self._first_call_pending:
            return micro_step(self.forward)
        self._first_call_pending = False
        snapshot = _StepSnapshot(self.model)
        try:
            return micro_step(self.forward)
        except Exception as err:
            snapshot.restore()
            self.forward, self.compiled = self.model, False
            warn_compile_unavailable(err, "training stays eager")
            return micro_step(self.forward)


class _StepSnapshot:
    """What one micro-step can change besides the optimizer's state, which it never touches:
    buffers, gradients and the random state (CPU, and the current CUDA device's)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.buffers: Dict[str, torch.Tensor] = {name: b.detach().clone() for name, b in model.named_buffers()}
        self.grads: List[Optional[torch.Tensor]] = [None if p.grad is None else p.grad.detach().clone()
                                                    for p in model.parameters()]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None

    @torch.no_grad()
    def restore(self) -> None:
        buffers = dict(self.model.named_buffers())
        for name, saved in self.buffers.items():
            buffers[name].copy_(saved)
        for param, saved in zip(self.model.parameters(), self.grads):
            param.grad = saved
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng)
