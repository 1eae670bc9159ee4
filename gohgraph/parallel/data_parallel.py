"""Several processes, one model: PyTorch DDP or FSDP2, applied to the model from outside.

``torchrun --nproc_per_node=N -m gohgraph train ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
:func:`init_distributed` reads them (gloo on CPU, nccl on CUDA). Without them everything here is
a no-op for a single process, so the trainer has one code path.

Routing-specific choices:

* ``find_unused_parameters`` is on only when a step can leave parameters without gradient: an
  expert that receives no token in a step has none. Routed *heads* always get gradients (every head
  is computed and gated; the router's logits reach every head through the softmax), so attention
  routing alone keeps DDP's cheaper default (tests/test_distributed.py checks both claims).
* Auxiliary-loss-free balancing counts each rank's own selections; :func:`sync_routing_loads`
  sums the counts over ranks before the bias update so every rank applies the same update, and
  buffers are not broadcast from rank 0 each forward (that would overwrite the local counts).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..config import GoHConfig
from ..routers.losses import BalancedRouting


@dataclass
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, its device, and the backend in use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> this rank's CUDA device if there is one, else CPU; other strings as given."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device == "cuda":
        return torch.device(f"cuda:{local_rank}")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a torch device ('auto', 'cpu', 'cuda', 'cuda:1', ...)") from None


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistContext(device=resolved)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved,
                       backend=dist.get_backend(), owns_group=owns)


def shutdown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def may_leave_parameters_unused(cfg: GoHConfig) -> bool:
    """True when some parameter can get no gradient in a step (experts that receive no token)."""
    return cfg.ffn != "dense"


def wrap_model(model: nn.Module, ctx: DistContext, fsdp: bool = False,
               ignored_params: Optional[Iterable[nn.Parameter]] = None) -> nn.Module:
    """DDP (or FSDP2 ``fully_shard`` per block, then the root) around ``model``; the model itself
    when single-process. FSDP2 shards ``model`` in place and returns it.

    ``ignored_params`` (FSDP2) stay as they are, neither sharded nor reduced: expert parallelism's
    expert shards (DDP learns them from :func:`~gohgraph.parallel.expert_parallel.apply_expert_parallel`).
    """
    if not ctx.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        ignored = set(ignored_params or ()) or None
        for block in model.blocks:
            fully_shard(block, ignored_params=ignored)
        fully_shard(model, ignored_params=ignored)
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # buffers are synced once at construction, never per forward (that would overwrite the
    # per-rank routing-load counters); newer PyTorch names this forward_sync_buffers
    no_forward_sync = ({"forward_sync_buffers": False}
                       if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                       else {"broadcast_buffers": False})
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=may_leave_parameters_unused(model.config),
        **no_forward_sync)


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    if enabled or not isinstance(wrapped, nn.parallel.DistributedDataParallel):
        yield
    else:
        with wrapped.no_sync():
            yield


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of a tensor over ranks (a copy; the input is untouched)."""
    value = value.detach().clone()
    if ctx.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= ctx.world_size
    return value


def all_reduce_sum_fn(ctx: DistContext) -> Optional[Callable[[torch.Tensor], None]]:
    """A function that sums a tensor over ranks in place (``None`` for one process)."""
    if not ctx.enabled:
        return None
    return lambda tensor: dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_reduce_gradients_mean(model: nn.Module, ctx: DistContext) -> None:
    """Average every gradient over ranks, as DDP's reducer would (for a backward run under
    ``no_sync``, such as the global-batch balance step's single backward over held graphs). A
    parameter without gradient on some rank counts as zero there; one without gradient on every
    rank keeps none, as one process would."""
    if not ctx.enabled:
        return
    params = [param for param in model.parameters() if param.requires_grad]
    has_grad = torch.tensor([param.grad is not None for param in params], dtype=torch.float32, device=ctx.device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    for param, used in zip(params, has_grad.tolist()):
        if not used:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad /= ctx.world_size


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if it is true on any (so all ranks stop at the same step)."""
    if not ctx.enabled:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def sync_routing_loads(model: nn.Module, ctx: DistContext) -> None:
    """Sum every routing-load counter over ranks, so bias updates agree everywhere."""
    if not ctx.enabled:
        return
    for module in model.modules():
        if isinstance(module, BalancedRouting):
            dist.all_reduce(module.load_since_update, op=dist.ReduceOp.SUM)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


# ---------------------------------------------------------------------- checkpoint views
def full_model_state(model: nn.Module, fsdp: bool) -> Dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, on every rank (gathered from shards with FSDP: a
    collective call then, which every rank must make)."""
    if fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        return {name: tensor.detach().cpu() for name, tensor in state.items()}
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    if fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    if fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        return
    optimizer.load_state_dict(state)
