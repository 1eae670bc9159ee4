"""How one training run is spread over processes: decided once from the :class:`TrainConfig`, then
asked by the loop (:mod:`gohgraph.training.trainer`) at each point where parallelism matters.

Four layouts, from ``TrainConfig`` and the ``torchrun`` environment (:class:`DistContext`):

* one process: everything below is the identity;
* data parallel (DDP, or FSDP2 with ``fsdp``): every rank reads its share of each batch, gradients
  are averaged over ranks (:mod:`gohgraph.parallel.data_parallel`);
* expert parallel (``expert_parallel = N``): every MoE layer's routed experts are sharded over the
  ranks with all-to-all dispatch, the rest is data parallel (:mod:`gohgraph.parallel.expert_parallel`);
* tensor parallel (``tensor_parallel = N``): every attention's heads and dense FFN are sharded; all
  ranks read the same batch and form one data rank (:mod:`gohgraph.parallel.tensor_parallel`).

The plan answers: which rows a rank reads (:attr:`data_rank` of :attr:`data_ranks`), how the model
is wrapped, whether a micro-batch synchronises gradients, how gradients are clipped (over shards),
how routing loads are pooled, and how the full model and optimizer states are gathered for a
checkpoint and loaded back from one.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch
from torch import nn

from ..parallel import data_parallel as D
from ..parallel import expert_parallel as EP
from ..parallel import tensor_parallel as TP
from .config import TrainConfig


class ParallelPlan:
    """The layout of one run (module docstring), for the model the run trains.

    Args:
        tc: the run's settings (``fsdp``, ``expert_parallel``, ``tensor_parallel``).
        ctx: the process group this process belongs to (:func:`~gohgraph.parallel.data_parallel.init_distributed`).
    """

    def __init__(self, tc: TrainConfig, ctx: D.DistContext) -> None:
        self.ctx = ctx
        self.fsdp = tc.fsdp
        self.expert_parallel = tc.expert_parallel > 1
        self.tensor_parallel = tc.tensor_parallel > 1
        # under tensor parallelism the ranks are one data rank: same batch, same dropout and router noise
        self.data_ranks = 1 if self.tensor_parallel else ctx.world_size
        self.data_rank = ctx.rank if self.data_ranks > 1 else 0
        self.wrapped: Optional[nn.Module] = None

    @property
    def shards_parameters(self) -> bool:
        """Whether a rank holds only part of some parameters (FSDP2, expert or tensor parallel)."""
        return self.fsdp or self.expert_parallel or self.tensor_parallel

    # ------------------------------------------------------------------ the model
    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard and wrap ``model`` (in place where the layout shards it); returns what the loop calls."""
        if self.expert_parallel:  # before DDP, which then leaves the expert shards alone
            EP.apply_expert_parallel(model)
        if self.tensor_parallel:  # no data parallel beside it: nothing to wrap
            self.wrapped = TP.apply_tensor_parallel(model)
        else:
            self.wrapped = D.wrap_model(model, self.ctx, self.fsdp,
                                        ignored_params=EP.expert_shard_parameters(model) if self.expert_parallel
                                        else None)
        return self.wrapped

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """A micro-batch's backward that averages gradients over ranks only where ``enabled`` (the
        step's last micro-batch), so accumulation communicates once per step."""
        with D.gradient_sync(self.wrapped, enabled):
            yield

    def clip_gradients(self, model: nn.Module, max_norm: float) -> float:
        """Clip to ``max_norm`` (0 = measure only) and return the total gradient norm, over every
        shard of every parameter."""
        if self.expert_parallel or self.tensor_parallel:
            return EP.clip_grad_norm_(model, max_norm)
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the shards
            norm = norm.full_tensor()
        return float(norm)

    def sync_routing_loads(self, model: nn.Module) -> None:
        """Pool the auxiliary-loss-free balancing's load counts over the data ranks (tensor-parallel
        ranks count the same, replicated, loads: nothing to pool)."""
        if not self.tensor_parallel:
            D.sync_routing_loads(model, self.ctx)

    # ------------------------------------------------------------------ checkpoints
    def full_model_state(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The whole model's state on every rank (shards gathered), as one process would save it."""
        return D.full_model_state(model, self.fsdp)

    def full_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The whole optimizer's state (shards gathered), keyed as one process would key it."""
        state = D.full_optimizer_state(model, optimizer, self.fsdp)
        if self.expert_parallel:
            state = EP.full_optimizer_state(model, optimizer, state)
        if self.tensor_parallel:
            state = TP.full_optimizer_state(model, optimizer, state)
        return state

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a whole optimizer state (a checkpoint's) into this rank's shards."""
        if self.expert_parallel:
            state = EP.local_optimizer_state(model, optimizer, state)
        if self.tensor_parallel:
            state = TP.local_optimizer_state(model, optimizer, state)
        D.load_optimizer_state(model, optimizer, state, self.fsdp)

    def ordinary_model(self, model: nn.Module, build) -> nn.Module:
        """``model`` as an ordinary, unsharded module on this process's device, to hand back after
        training: a model sharded over a process group about to close is rebuilt with ``build()``
        and given the gathered state; an unsharded one is returned as it is."""
        if not (self.shards_parameters and self.ctx.enabled):
            return model
        full_state = self.full_model_state(model)
        plain = build()
        plain.load_state_dict(full_state)
        return plain.to(self.ctx.device)
