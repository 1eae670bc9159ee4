r"""Expert parallelism: each rank holds ``E / N`` routed experts of every MoE layer, and sub-tokens
travel to their expert's rank and back with ``all_to_all_single``.

Applied to a built model from outside (torchtitan style): :func:`apply_expert_parallel` swaps each
:class:`~gohgraph.moe.layer.MoEFeedForward`'s experts for a :class:`ShardedGroupedExperts`
(rank ``r`` keeps experts ``r E/N .. (r+1) E/N - 1``) and its
:class:`~gohgraph.moe.dispatch.LocalDispatcher` for an :class:`ExpertParallelDispatcher`. Everything
else (embeddings, attention, routers, shared experts) is left to data parallelism: DDP, which
is told to ignore the expert shards, or FSDP2 with the shards as ``ignored_params``
(:func:`gohgraph.parallel.data_parallel.wrap_model`). Every rank feeds its own batch, as in data
parallelism, and the expert group spans the same ranks.

One MoE layer, on rank ``r`` of ``N`` (``S`` local sub-tokens, top-``k``, width ``d``):

1. the per-expert counts ``load [E]`` are all-gathered first, ``loads [N, E]``: they give the global
   load (the routing stats), the capacity, the drops and both sides' split sizes, so no other
   count ever travels;
2. the kept rows, sorted by expert (hence by destination rank), go out with ``all_to_all_single``;
   they arrive ordered by source rank then expert and are regrouped by expert then source rank;
3. the local experts run one grouped matmul over them;
4. the outputs go back by the inverse permutation and a second ``all_to_all_single``, and are
   gate-weighted into their sub-tokens locally (the backward runs the same two exchanges reversed).

**Capacity is global.** The ranks' batches are the contiguous slices of the global batch
(:func:`gohgraph.data.batches.train_batch`), so the single process's priority order (position in
the concatenated batch, then choice rank) is: rank 0's assignments in their flat order, then
rank 1's, and so on. The capacity is :func:`~gohgraph.moe.dispatch.expert_capacity` over the
``sum(loads) / k`` sub-tokens of *all* ranks, and rank ``r`` may fill only the slots of expert ``e``
that ranks ``< r`` left: ``capacity - sum_{j<r} loads[j, e]``. The kept and dropped assignments are
therefore exactly those of one process running the concatenated batch (tests/parallel checks it).

Bytes sent per layer and forward by one rank: ``rows sent off-rank x d x dtype bytes`` each way,
which under uniform routing is ``S k d b (N-1)/N`` each way (:attr:`ExpertParallelDispatcher.sent_bytes`
counts the measured value).

Gradients: the rows of every rank reach an expert's owner, so its shard's gradient is the *sum*
of the ranks' losses' gradients; DDP / FSDP2 average the replicated gradients, so the shards' gradients
are divided by ``N`` as they are computed, and both equal the gradient of the global mean loss.

Checkpoints: :meth:`torch.nn.Module.state_dict` of a sharded model gathers the shards to full
``[E, ...]`` tensors (a collective: every rank of the group must call it), and
``load_state_dict`` of full tensors keeps this rank's slice, so a checkpoint is the same whatever
the layout it was written under.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..moe.dispatch import DispatchPlan, combine, dispatch, expert_capacity, plan_dispatch
from ..moe.experts import GroupedExperts
from ..moe.layer import MoEFeedForward
from ..routing import ExpertRouting

SHARDED_WEIGHTS = ("w_in", "w_out")


# ---------------------------------------------------------------------- layout
def moe_layers(model: nn.Module) -> List[MoEFeedForward]:
    return [module for module in model.modules() if isinstance(module, MoEFeedForward)]


def check_expert_parallel_layout(model: nn.Module, n_ranks: int) -> List[MoEFeedForward]:
    """The model's MoE layers, after checking that ``n_ranks`` can split each one's routed experts."""
    if n_ranks < 1:
        raise ValueError(f"expert_parallel={n_ranks} must be a positive number of ranks")
    layers = moe_layers(model)
    if not layers:
        config = getattr(model, "config", None)
        detail = f" (ffn={config.ffn!r}, n_layers={config.n_layers}, n_dense_layers={config.n_dense_layers})" \
            if config is not None else ""
        raise ValueError(f"expert_parallel={n_ranks} needs MoE layers, but the model has none{detail}")
    for layer in layers:
        if layer.n_routed % n_ranks:
            raise ValueError(f"n_routed_experts={layer.n_routed} (layer {layer.layer_idx}) is not divisible by "
                             f"expert_parallel={n_ranks}: every rank must hold the same number of experts")
    return layers


def apply_expert_parallel(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Shard every MoE layer's routed experts over ``group`` (a new group of all ranks when ``None``)
    and install the all-to-all dispatcher; returns ``model``, changed in place.

    Call on every rank, after the weights are final (built with the same seed or loaded) and moved
    to their device, and before DDP wraps the model (DDP is told to leave the shards alone).
    """
    if not dist.is_initialized():
        raise RuntimeError("apply_expert_parallel needs torch.distributed initialised (run under torchrun)")
    n_ranks, world = dist.get_world_size(group), dist.get_world_size()
    if n_ranks != world:
        raise ValueError(f"expert_parallel={n_ranks} over {n_ranks} of {world} ranks is not supported yet: the "
                         "expert group must span every rank (replicated expert shards would need their own "
                         "gradient all-reduce)")
    layers = check_expert_parallel_layout(model, n_ranks)
    if sharded_experts(model):
        raise ValueError("apply_expert_parallel: the model's experts are already sharded")
    if group is None:
        # a group of its own, so the token exchanges never interleave with DDP's gradient buckets
        group = dist.new_group(list(range(dist.get_world_size())))
    for layer in layers:
        layer.experts = ShardedGroupedExperts(layer.experts, group)
        layer.dispatcher = ExpertParallelDispatcher(layer.n_routed, group)
    shards = {id(p) for p in expert_shard_parameters(model)}
    ignored = [name for name, param in model.named_parameters() if id(param) in shards]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return model


def sharded_experts(model: nn.Module) -> List["ShardedGroupedExperts"]:
    return [module for module in model.modules() if isinstance(module, ShardedGroupedExperts)]


def is_expert_shard(model: nn.Module, param: torch.Tensor) -> bool:
    return any(param is getattr(experts, name) for experts in sharded_experts(model) for name in SHARDED_WEIGHTS)


# ---------------------------------------------------------------------- the exchange
class _AllToAll(torch.autograd.Function):
    """``rows [sum(in_splits), d]`` -> ``[sum(out_splits), d]``; the backward exchanges back."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, out_splits: List[int], in_splits: List[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = rows.new_empty(sum(out_splits), rows.shape[-1])
        dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        grad_rows = grad.new_empty(sum(in_splits), grad.shape[-1])
        dist.all_to_all_single(grad_rows, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_rows, None, None, None


@dataclass
class ExpertParallelPlan(DispatchPlan):
    """A :class:`~gohgraph.moe.dispatch.DispatchPlan` of this rank's sub-tokens (``expert_load``
    and ``capacity`` global), plus the exchange: ``send_splits [N]`` rows sent to each rank,
    ``receive_splits [N]`` rows received from each, and ``receive_order [rows]``, the received
    row each expert-grouped row is."""

    send_splits: List[int]
    receive_splits: List[int]
    receive_order: torch.Tensor


class ExpertParallelDispatcher:
    """:class:`~gohgraph.moe.dispatch.Dispatcher` for experts sharded over ``group`` (module docstring).

    ``dispatch(tokens [S, d], expert_ids [S, k], capacity_factor)`` -> ``(grouped [rows, d],
    group_offsets [E/N] int32, ExpertParallelPlan)``, ``rows`` being what this rank's experts
    received from every rank; ``combine(expert_out [rows, d], plan, weights [S, k])`` -> ``[S, d]``.
    :attr:`sent_bytes` adds up the bytes this rank sent to other ranks in forwards (both exchanges).
    """

    def __init__(self, n_experts: int, group: dist.ProcessGroup) -> None:
        self.n_experts, self.group = n_experts, group
        self.n_ranks, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.n_local = n_experts // self.n_ranks
        self.first_expert = self.rank * self.n_local
        self.sent_bytes = 0

    def dispatch(self, tokens: torch.Tensor, expert_ids: torch.Tensor, capacity_factor: Optional[float]
                 ) -> Tuple[torch.Tensor, torch.Tensor, ExpertParallelPlan]:
        n_ranks, n_local = self.n_ranks, self.n_local
        top_k = expert_ids.shape[-1]
        load = torch.bincount(expert_ids.reshape(-1), minlength=self.n_experts)
        gathered = [torch.empty_like(load) for _ in range(n_ranks)]
        dist.all_gather(gathered, load, group=self.group)
        loads = torch.stack(gathered)  # [N, E]
        capacity = expert_capacity(capacity_factor, int(loads.sum()) // top_k, top_k, self.n_experts)
        taken_before = loads.cumsum(0) - loads  # [N, E]: slots of lower ranks' assignments
        kept = loads if capacity is None else torch.minimum(loads, (capacity - taken_before).clamp(min=0))
        plan = plan_dispatch(expert_ids, self.n_experts, capacity,
                             None if capacity is None else taken_before[self.rank])

        mine = slice(self.first_expert, self.first_expert + n_local)
        send_splits = kept[self.rank].view(n_ranks, n_local).sum(-1).tolist()
        from_each = kept[:, mine]  # [N, E/N] rows per (source rank, local expert)
        receive_splits = from_each.sum(-1).tolist()
        received = _AllToAll.apply(dispatch(tokens, plan), receive_splits, send_splits, self.group)
        self._count(send_splits, tokens)
        # rows arrive by source rank, then expert; the grouped matmul wants them by expert, then
        # source rank (a stable sort keeps the global capacity priority inside each expert)
        local_expert = torch.arange(n_local, device=tokens.device).repeat(n_ranks)
        row_expert = local_expert.repeat_interleave(from_each.reshape(-1).to(tokens.device))
        receive_order = torch.sort(row_expert, stable=True).indices
        group_offsets = from_each.sum(0).cumsum(0).to(device=tokens.device, dtype=torch.int32)
        values = {f.name: getattr(plan, f.name) for f in fields(DispatchPlan)}
        values["expert_load"] = loads.sum(0)
        parallel_plan = ExpertParallelPlan(**values, send_splits=send_splits, receive_splits=receive_splits,
                                           receive_order=receive_order)
        return received.index_select(0, receive_order), group_offsets, parallel_plan

    def combine(self, expert_out: torch.Tensor, plan: ExpertParallelPlan, weights: torch.Tensor) -> torch.Tensor:
        inverse = torch.empty_like(plan.receive_order)
        inverse[plan.receive_order] = torch.arange(inverse.numel(), device=inverse.device)
        back = _AllToAll.apply(expert_out.index_select(0, inverse), plan.send_splits, plan.receive_splits,
                               self.group)
        self._count(plan.receive_splits, expert_out)
        return combine(back, plan, weights, weights.shape[0])

    def _count(self, splits: Sequence[int], rows: torch.Tensor) -> None:
        off_rank = sum(splits) - splits[self.rank]
        self.sent_bytes += off_rank * rows.shape[-1] * rows.element_size()

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(experts={self.n_experts}, ranks={self.n_ranks}, "
                f"local={self.first_expert}..{self.first_expert + self.n_local - 1})")


# ---------------------------------------------------------------------- the shards
class ShardedGroupedExperts(GroupedExperts):
    """This rank's slice of a :class:`~gohgraph.moe.experts.GroupedExperts`: experts
    ``first_expert .. first_expert + n_experts - 1`` of ``n_experts_total``.

    Weights ``w_in [E/N, d, 2h]``, ``w_out [E/N, h, d]`` (same names as the full module);
    ``forward`` is the full module's over the local groups. ``state_dict`` holds the full
    ``[E, ...]`` tensors (gathered: a collective), ``load_state_dict`` takes full tensors (or this
    rank's slice). Gradients are divided by the group size as they arrive (module docstring).
    """

    def __init__(self, full: GroupedExperts, group: dist.ProcessGroup) -> None:
        nn.Module.__init__(self)
        self.group = group
        self.n_ranks, rank = dist.get_world_size(group), dist.get_rank(group)
        self.n_experts_total = full.n_experts
        self.n_experts = full.n_experts // self.n_ranks
        self.first_expert = rank * self.n_experts
        self.d_model, self.hidden, self.activation = full.d_model, full.hidden, full.activation
        self.init_std, self.out_std = full.init_std, full.out_std
        mine = slice(self.first_expert, self.first_expert + self.n_experts)
        for name in SHARDED_WEIGHTS:
            shard = nn.Parameter(getattr(full, name).detach()[mine].clone())
            shard.register_hook(self._average_over_ranks)
            setattr(self, name, shard)
        self.register_state_dict_post_hook(_gather_shards)
        self.register_load_state_dict_pre_hook(_keep_own_slice)

    def _average_over_ranks(self, grad: torch.Tensor) -> torch.Tensor:
        return grad / self.n_ranks

    def extra_repr(self) -> str:
        return (f"experts={self.first_expert}..{self.first_expert + self.n_experts - 1} of {self.n_experts_total}, "
                f"d_model={self.d_model}, hidden={self.hidden}, activation={self.activation}")


def _gather_shards(module: ShardedGroupedExperts, state: Dict[str, torch.Tensor], prefix: str, _metadata) -> None:
    for name in SHARDED_WEIGHTS:
        key = prefix + name
        if key in state:
            state[key] = gather_shard(state[key].detach(), module.group)


def _keep_own_slice(module: ShardedGroupedExperts, state: Dict[str, torch.Tensor], prefix: str, *_args) -> None:
    for name in SHARDED_WEIGHTS:
        key = prefix + name
        if key in state and state[key].shape[0] == module.n_experts_total != module.n_experts:
            state[key] = state[key][module.first_expert:module.first_expert + module.n_experts]


def gather_shard(shard: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[E/N, ...]`` on each rank -> ``[E, ...]`` (rank order) on every rank."""
    pieces = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, shard.contiguous(), group=group)
    return torch.cat(pieces, dim=0)


# ---------------------------------------------------------------------- training helpers
def clip_grad_norm_(model: nn.Module, max_norm: float) -> float:
    """Clip every gradient to a total norm of ``max_norm`` (0 = measure only) and return the norm
    of the full gradient, equal on every rank and to the single process's.

    Squares of the split gradients (expert shards, and DTensors sharded over their mesh: FSDP2's
    gradient shards, tensor parallelism's column/row shards; their mesh is assumed to span the same
    ranks as the experts' group, or every rank without experts) are summed over the group;
    replicated gradients (DDP's, replicated DTensors) count once. Serves tensor parallelism too.
    """
    shards = {id(p) for p in expert_shard_parameters(model)}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    split = [_local(g) for p in model.parameters() if (g := p.grad) is not None
             and (id(p) in shards or _is_sharded_dtensor(g))]
    whole = [_local(g) for p in model.parameters() if (g := p.grad) is not None and id(p) not in shards
             and not _is_sharded_dtensor(g)]
    device = grads[0].device if grads else torch.device("cpu")
    squares = _squares(whole, device)
    if split:
        split_squares = _squares(split, device)
        experts = sharded_experts(model)
        dist.all_reduce(split_squares, group=experts[0].group if experts else None)
        squares = squares + split_squares
    total = float(squares.sqrt())
    if max_norm > 0:  # torch.nn.utils.clip_grad_norm_'s rule
        scale = min(1.0, max_norm / (total + CLIP_EPS))
        for grad in grads:
            grad.mul_(scale)
    return total


CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _is_sharded_dtensor(tensor: torch.Tensor) -> bool:
    return _is_dtensor(tensor) and any(placement.is_shard() for placement in tensor.placements)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _squares(grads: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device)
    return torch.stack([grad.detach().float().pow(2).sum() for grad in grads]).sum()


def expert_shard_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Every expert shard of ``model`` (for DDP / FSDP2 to leave alone)."""
    return [getattr(experts, name) for experts in sharded_experts(model) for name in SHARDED_WEIGHTS]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """``optimizer.state_dict()`` with every expert shard's moments gathered to ``[E, ...]`` (a
    collective), so it loads under any layout."""
    return map_parameter_state(model, optimizer, state, _shard_owners(model),
                               lambda tensor, experts: gather_shard(tensor, experts.group))


def local_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """The reverse of :func:`full_optimizer_state`: keep this rank's slice of the experts' moments."""
    def own_slice(tensor: torch.Tensor, experts: ShardedGroupedExperts) -> torch.Tensor:
        if tensor.shape[0] != experts.n_experts_total:
            return tensor
        return tensor[experts.first_expert:experts.first_expert + experts.n_experts].clone()
    return map_parameter_state(model, optimizer, state, _shard_owners(model), own_slice)


def _shard_owners(model: nn.Module) -> dict:
    return {id(getattr(experts, name)): experts for experts in sharded_experts(model) for name in SHARDED_WEIGHTS}


def map_parameter_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, owners: dict,
                        change) -> dict:
    """``state`` (an optimizer state dict) with every moment of a parameter in ``owners`` (``id(param)
    -> owner``) replaced by ``change(moment, owner)``; scalars (AdamW's step) and other parameters'
    moments stay as they are."""
    # keys are parameter indices (plain optimizers) or names (FSDP2's full state dicts)
    by_index = [owners.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
    by_name = {name: owners.get(id(p)) for name, p in model.named_parameters()}
    moments = {}
    for key, values in state["state"].items():
        owner = by_name.get(key) if isinstance(key, str) and not key.isdigit() else by_index[int(key)]
        if owner is None:
            moments[key] = values
        else:
            moments[key] = {field: change(value, owner) if torch.is_tensor(value) and value.dim() > 0 else value
                            for field, value in values.items()}
    return {**state, "state": moments}


def expert_routing_stats(routings: Iterable[ExpertRouting], n_experts: int,
                         group: Optional[dist.ProcessGroup] = None, across_ranks: bool = True
                         ) -> Dict[str, torch.Tensor]:
    """Per MoE layer, summed over the ranks of ``group`` (when distributed is initialised and
    ``across_ranks``; otherwise this process's alone):
    ``expert_load [layers, E]`` assignments each expert was asked for (before capacity),
    ``dropped_assignments [layers]`` and ``dropped_subtokens [layers]`` (capacity overflow) and
    ``subtokens [layers]``. Under expert parallelism these equal one process's over the
    concatenated batch."""
    routings = list(routings)
    stats = {
        "expert_load": torch.stack([torch.bincount(r.expert_indices.reshape(-1).cpu(), minlength=n_experts)
                                    for r in routings]),
        "dropped_assignments": torch.stack([_count(r.expert_drops) for r in routings]),
        "dropped_subtokens": torch.stack([_count(r.dropped) for r in routings]),
        "subtokens": torch.tensor([r.expert_indices[..., 0].numel() for r in routings]),
    }
    if across_ranks and dist.is_initialized() and dist.get_world_size(group) > 1:
        for value in stats.values():
            dist.all_reduce(value, group=group)
    return stats


def _count(flags: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.zeros((), dtype=torch.long) if flags is None else flags.sum().cpu().long()
