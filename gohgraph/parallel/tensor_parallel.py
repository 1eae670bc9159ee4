r"""Tensor parallelism: each rank computes ``H / N`` heads of every attention and ``1 / N`` of every
dense FFN's hidden units, through DTensor (``torch.distributed.tensor.parallel``) over a 1-D mesh.

Applied to a built model from outside (torchtitan style): :func:`apply_tensor_parallel` runs
``parallelize_module`` with ``ColwiseParallel`` on the projections that fan out (attention ``qkv``,
SwiGLU ``gate_up``, the MLP's ``fc``) and ``RowwiseParallel`` on those that write back into the
residual stream (attention ``out``, ``down``, ``proj``): Megatron's pairing, so each block costs one
all-reduce of ``[tokens, d_model]`` forward (after the row-parallel projection) and one backward
(the column-parallel projection's input gradient). Embeddings, norms, the output head and the head
routers stay replicated: every rank runs the same batch, so their inputs, outputs and gradients
are the same on every rank and need no exchange.

**Fused projections.** ``qkv`` stacks ``[q; k; v]`` and ``gate_up`` stacks ``[gate; up]``, and
``Shard(0)`` cuts contiguous row blocks, so the rows are reordered first to
``[q_0; k_0; v_0; q_1; k_1; v_1; ...]`` (rank ``r``'s heads of each part together): rank ``r``
holds query heads ``r H/N .. (r+1) H/N - 1`` and key/value heads ``r H_kv/N ..``, which are exactly
the kv heads its query heads read under GQA (``H/N`` is a multiple of ``H/H_kv``). The attention's
``n_heads``/``n_kv_heads`` (and ``n_shared_heads``) are set to the local counts and it runs unchanged
on them, head-sparse execution included.

**Head routing.** The gates of rank ``r``'s heads depend on every head: MoH's linear router reads the
token (replicated already), GoH's graph router runs message passing over all heads' node features
(``z_i = W_z q_i + e_i``), the query-norm router normalises over all heads' query norms, and the
gates' top-k and softmaxes are over all heads. The simplest exact scheme: the router and gate run
**replicated on the full inputs**: the graph and query-norm routers get the pre-RoPE queries
all-gathered over the ranks (``[tokens, H, d_h]``, backward: this rank's slice of the gradient,
which every rank computes whole and equal), and the gates ``[tokens, H]`` and, with inter-head flow,
the mixing rows of the local heads ``M[:, local, :]`` are sliced out (backward: the slices'
gradients all-gathered, so every rank's router backward sees the full, equal gradient and the
router's parameter gradients are replicated like any other). Records (gates, logits, flow) are
the full ones, equal to one process's.

**Inter-head flow** ``y_i = Σ_j M_ij o_j`` reads the outputs ``o_j`` of heads on other ranks: the
heads' outputs are all-gathered ``[tokens, H, d_h]`` before the local rows of ``M`` are applied
(backward: the partial gradients summed and sliced, a reduce-scatter; an all-reduce on gloo, which
has no reduce-scatter).

Bytes this rank sends per layer and step (``T`` tokens, ``b`` the activation dtype size, ring
collectives: an all-reduce sends ``2 (N-1)/N`` of the tensor, an all-gather ``(N-1)/N``):

* attention and FFN, each: ``2 x T d_model b x 2(N-1)/N`` (one all-reduce forward, one backward);
* routers that read queries (graph, query-norm): ``T H d_h b (N-1)/N`` forward;
* gates: ``T H b (N-1)/N`` backward without flow; with flow the gates reach the heads only through
  the mixing rows: ``T H^2 b (N-1)/N`` backward instead;
* flow: ``T H d_h b (N-1)/N`` forward and ``T H d_h b (N-1)/N`` backward (reduce-scatter;
  ``2 (N-1)/N`` with gloo's all-reduce).

:class:`TensorParallelTraffic` counts what is sent (``sent_bytes_forward``/``sent_bytes_backward``).

Checkpoints: ``state_dict`` of a parallelised model holds full tensors in the single-process row
order (gathered: a collective, every rank must call it), and ``load_state_dict`` takes full tensors
and keeps this rank's shard, so a checkpoint loads under any layout; :func:`full_optimizer_state`
and :func:`local_optimizer_state` do the same for AdamW's moments.

Scope: the tensor-parallel group is every rank (data parallel over further ranks, expert parallel,
FSDP2, MoE layers, MLA, ALiBi and BitNet projections are refused with a one-line error).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..layers.attention import GoHAttention, mix_heads
from ..layers.latent_attention import LatentAttention
from ..layers.mlp import GeluMLP, SwiGLU
from ..models.families import family_of, model_types
from ..moe.layer import MoEFeedForward
from ..routers.heads import HeadRouting
from .expert_parallel import map_parameter_state

# routers whose logits read every head's query (the linear router reads only the token)
QUERY_READING_ROUTERS = ("graph", "query-norm")


# ---------------------------------------------------------------------- layout
@dataclass
class TensorParallelLayout:
    """What :func:`check_tensor_parallel_layout` found: the attentions and dense FFNs to shard."""

    attentions: List[GoHAttention]
    mlps: List[nn.Module]


def check_tensor_parallel_layout(model: nn.Module, n_ranks: int,
                                 world_size: Optional[int] = None) -> TensorParallelLayout:
    """The modules to shard, after checking that ``n_ranks`` splits every head count and FFN width
    (and fits in ``world_size`` processes, when given); a one-line ``ValueError`` naming the numbers
    otherwise."""
    if n_ranks < 1:
        raise ValueError(f"tensor_parallel={n_ranks} must be a positive number of ranks")
    if world_size is not None and n_ranks > world_size:
        raise ValueError(f"tensor_parallel={n_ranks} exceeds the {world_size} processes: run under "
                         f"torchrun --nproc_per_node={n_ranks}")
    config = getattr(model, "config", None)
    if config is not None:
        if not family_of(config).tensor_parallel:
            supported = " and ".join(model_types(lambda family: family.tensor_parallel))
            raise ValueError(f"tensor_parallel={n_ranks} supports {supported} models, not "
                             f"model_type={config.model_type!r}")
        if config.linear != "standard":
            raise ValueError(f"tensor_parallel={n_ranks} shards nn.Linear projections, not linear={config.linear!r}")
    for module in model.modules():
        if isinstance(module, LatentAttention):
            raise ValueError(f"tensor_parallel={n_ranks} does not shard attention='mla' (layer {module.layer_idx})")
        if isinstance(module, MoEFeedForward):
            raise ValueError(f"tensor_parallel={n_ranks} does not shard MoE layers (layer {module.layer_idx}); "
                             "shard their experts with expert_parallel instead")
    attentions = [module for module in model.modules() if isinstance(module, GoHAttention)]
    for attention in attentions:
        for name, count in (("n_heads", attention.n_heads), ("n_kv_heads", attention.n_kv_heads)):
            if count % n_ranks:
                raise ValueError(f"{name}={count} (layer {attention.layer_idx}) is not divisible by "
                                 f"tensor_parallel={n_ranks}: every rank must hold the same number of heads")
        if attention.sparse_heads is not None:
            raise ValueError(f"tensor_parallel={n_ranks} does not shard n_mosa_heads (MoSA's sparse heads; layer "
                             f"{attention.layer_idx})")
        if attention.switch_head is not None:
            raise ValueError(f"tensor_parallel={n_ranks} does not shard n_attention_experts (SwitchHead; layer "
                             f"{attention.layer_idx})")
        if attention.talking_heads:
            raise ValueError(f"tensor_parallel={n_ranks} does not shard talking_heads=True (layer "
                             f"{attention.layer_idx}): its [heads, heads] mixing reads every rank's heads")
        if attention.score_bias is not None:
            raise ValueError(f"tensor_parallel={n_ranks} does not split ALiBi's per-head slopes "
                             f"(layer {attention.layer_idx}); use position_embedding='rope'")
    mlps = [module for module in model.modules() if isinstance(module, (SwiGLU, GeluMLP))]
    for index, mlp in enumerate(mlps):
        hidden = _hidden_width(mlp)
        if hidden % n_ranks:
            raise ValueError(f"hidden_dim={hidden} (FFN {index}) is not divisible by tensor_parallel={n_ranks}: "
                             "every rank must hold the same number of hidden units")
    return TensorParallelLayout(attentions, mlps)


def _hidden_width(mlp: nn.Module) -> int:
    return mlp.down.in_features if isinstance(mlp, SwiGLU) else mlp.fc.out_features


# ---------------------------------------------------------------------- applying it
@dataclass
class TensorParallelTraffic:
    """Bytes this rank sent to other ranks (ring collectives; module docstring), split by pass."""

    n_ranks: int
    sent_bytes_forward: float = 0.0
    sent_bytes_backward: float = 0.0

    def all_gather(self, local: torch.Tensor, backward: bool = False) -> None:
        self._add(local.numel() * local.element_size() * (self.n_ranks - 1), backward)

    def all_reduce(self, whole: torch.Tensor, backward: bool = False) -> None:
        self._add(2 * whole.numel() * whole.element_size() * (self.n_ranks - 1) / self.n_ranks, backward)

    def reduce_scatter(self, whole: torch.Tensor, backward: bool = False) -> None:
        self._add(whole.numel() * whole.element_size() * (self.n_ranks - 1) / self.n_ranks, backward)

    def reset(self) -> None:
        self.sent_bytes_forward = self.sent_bytes_backward = 0.0

    def _add(self, sent: float, backward: bool) -> None:
        if backward:
            self.sent_bytes_backward += sent
        else:
            self.sent_bytes_forward += sent


@dataclass
class TensorParallelPlan:
    """How a model was parallelised: the mesh, its group, this rank, the traffic counter and the
    layout of every sharded parameter (by ``id``)."""

    mesh: object
    group: dist.ProcessGroup
    n_ranks: int
    rank: int
    traffic: TensorParallelTraffic
    layouts: Dict[int, "ShardLayout"] = field(default_factory=dict)


_PLANS: "weakref.WeakKeyDictionary[nn.Module, TensorParallelPlan]" = weakref.WeakKeyDictionary()


def tensor_parallel_plan(model: nn.Module) -> Optional[TensorParallelPlan]:
    """The plan :func:`apply_tensor_parallel` gave ``model``, or ``None`` when it was not applied."""
    return _PLANS.get(model)


def apply_tensor_parallel(model: nn.Module, n_ranks: Optional[int] = None) -> nn.Module:
    """Shard every attention's heads and every dense FFN's hidden units over all ranks (module
    docstring); returns ``model``, changed in place.

    Call on every rank, after the weights are final (built with the same seed or loaded) and moved
    to their device. Every rank then feeds the *same* batch. ``n_ranks`` (default: the world size)
    must equal the world size: tensor parallel combined with data parallel is not supported.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if not dist.is_initialized():
        raise RuntimeError("apply_tensor_parallel needs torch.distributed initialised (run under torchrun)")
    world = dist.get_world_size()
    n_ranks = world if n_ranks is None else n_ranks
    layout = check_tensor_parallel_layout(model, n_ranks, world)
    if n_ranks != world:
        raise ValueError(f"tensor_parallel={n_ranks} over {n_ranks} of {world} ranks is not supported: "
                         "tensor parallel must span every rank (no data parallel beside it)")
    if tensor_parallel_plan(model) is not None:
        raise ValueError("apply_tensor_parallel: the model is already tensor parallel")
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (n_ranks,), mesh_dim_names=("tp",))
    plan = TensorParallelPlan(mesh, mesh.get_group(), n_ranks, dist.get_rank(), TensorParallelTraffic(n_ranks))
    for attention in layout.attentions:
        head_width = attention.head_dim
        _reorder_rows(attention.qkv, [attention.n_heads * head_width, attention.n_kv_heads * head_width,
                                      attention.n_kv_heads * head_width], n_ranks)
        parallelize_module(attention, mesh, {"qkv": ColwiseParallel(), "out": RowwiseParallel()})
        attention.n_heads //= n_ranks
        attention.n_kv_heads //= n_ranks
        # the shared (always active) heads come first: this rank's share of them, for head-sparse
        # execution (docs/skipping-work.md), which runs them by the fused kernel
        first_head = plan.rank * attention.n_heads
        attention.n_shared_heads = min(max(attention.n_shared_heads - first_head, 0), attention.n_heads)
        _shard_pair(plan, attention.qkv, attention.out)
        if attention.head_routing is not None:
            attention.head_routing = TensorParallelHeadRouting(attention.head_routing, plan)
    for mlp in layout.mlps:
        if isinstance(mlp, SwiGLU):
            _reorder_rows(mlp.gate_up, [mlp.down.in_features] * 2, n_ranks)
            parallelize_module(mlp, mesh, {"gate_up": ColwiseParallel(), "down": RowwiseParallel()})
            _shard_pair(plan, mlp.gate_up, mlp.down)
        else:
            parallelize_module(mlp, mesh, {"fc": ColwiseParallel(), "proj": RowwiseParallel()})
            _shard_pair(plan, mlp.fc, mlp.proj)
    _PLANS[model] = plan
    return model


def _reorder_rows(linear: nn.Linear, widths: Sequence[int], n_ranks: int) -> None:
    """Put rank ``r``'s rows of every stacked part together (module docstring); the order is kept on
    the module (``row_order``) for the checkpoint hooks."""
    starts = torch.tensor([0, *widths]).cumsum(0).tolist()
    order = torch.cat([torch.arange(start + rank * width // n_ranks, start + (rank + 1) * width // n_ranks)
                       for rank in range(n_ranks) for start, width in zip(starts, widths)])
    with torch.no_grad():
        linear.weight.data = linear.weight.data[order.to(linear.weight.device)]
        if linear.bias is not None:
            linear.bias.data = linear.bias.data[order.to(linear.bias.device)]
    linear.row_order = order


def _shard_pair(plan: TensorParallelPlan, column: nn.Linear, row: nn.Linear) -> None:
    """Record the layouts of a column- and a row-parallel projection, count their all-reduces and
    make their state dicts full tensors."""
    for linear in (column, row):
        layouts = {name: ShardLayout(plan, param, getattr(linear, "row_order", None) if linear is column else None)
                   for name, param in linear.named_parameters(recurse=False)}
        for name, param in linear.named_parameters(recurse=False):
            plan.layouts[id(param)] = layouts[name]
        linear.register_state_dict_post_hook(partial(_full_tensors, layouts))
        linear.register_load_state_dict_pre_hook(partial(_local_shards, layouts))
    traffic = plan.traffic

    def count_input_gradient(_module, args) -> None:
        # ColwiseParallel all-reduces its input's gradient (Partial -> Replicate) in the backward
        if args[0].requires_grad:
            args[0].register_hook(lambda grad: traffic.all_reduce(grad, backward=True))

    def count_output(_module, _args, output) -> None:
        traffic.all_reduce(output)  # RowwiseParallel all-reduces its output in the forward

    column.register_forward_pre_hook(count_input_gradient, prepend=True)  # before the DTensor conversion
    row.register_forward_hook(count_output)


class ShardLayout:
    """One sharded parameter (a DTensor), and the row order of a fused projection.

    :meth:`full` turns this rank's DTensor (or a tensor already full) into the full tensor in the
    single-process row order (a collective for DTensors); :meth:`local` turns a full tensor into
    this rank's shard, a DTensor placed like the parameter.
    """

    def __init__(self, plan: TensorParallelPlan, param: nn.Parameter, row_order: Optional[torch.Tensor]) -> None:
        self.plan, self.param, self.row_order = plan, param, row_order

    def full(self, tensor: torch.Tensor) -> torch.Tensor:
        if _is_dtensor(tensor):
            tensor = tensor.full_tensor()
        if self.row_order is None:
            return tensor
        restored = torch.empty_like(tensor)
        restored[self.row_order.to(tensor.device)] = tensor
        return restored

    def local(self, full: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        like = self.param
        if self.row_order is not None:
            full = full[self.row_order.to(full.device)]
        placement = like.placements[0]
        piece = full.chunk(self.plan.n_ranks, dim=placement.dim)[self.plan.rank] if placement.is_shard() else full
        return DTensor.from_local(piece.to(like.device).contiguous(), self.plan.mesh, like.placements, run_check=False)


def _full_tensors(layouts: Dict[str, ShardLayout], module: nn.Module, state: dict, prefix: str, _metadata) -> None:
    for name, layout in layouts.items():
        if prefix + name in state:
            state[prefix + name] = layout.full(state[prefix + name].detach())


def _local_shards(layouts: Dict[str, ShardLayout], module: nn.Module, state: dict, prefix: str, *_args) -> None:
    for name, layout in layouts.items():
        key = prefix + name
        if key in state and not _is_dtensor(state[key]):
            state[key] = layout.local(state[key])


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


# ---------------------------------------------------------------------- head routing over split heads
class TensorParallelHeadRouting(HeadRouting):
    """A :class:`~gohgraph.routers.heads.HeadRouting` whose attention computes only this rank's
    heads: the routing itself runs replicated on every head (module docstring).

    ``forward(x [batch, seq, d_model], q [batch, seq, H/N, d_h])`` -> ``(gates [batch, seq, H/N],
    mixing [batch, seq, H/N, H] or None, record over all H heads)``;
    ``mix(attn [batch, seq, H/N, d_v], gates, mixing)`` -> ``[batch, seq, H/N, d_v]``.
    """

    def __init__(self, full: HeadRouting, plan: TensorParallelPlan) -> None:
        nn.Module.__init__(self)
        # adopt the routing's parameters, submodules and settings: the same state-dict names
        self.__dict__.update({name: value for name, value in full.__dict__.items() if name != "training"})
        self.training = full.training
        self.plan = plan

    def forward(self, x: torch.Tensor, q: torch.Tensor, token_mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], "object"]:
        plan = self.plan
        if self.router_kind in QUERY_READING_ROUTERS:
            q = _GatherForReplicated.apply(q, 2, plan)
        gates, mixing, routing = super().forward(x, q, token_mask)
        gates = _SliceLocal.apply(gates, 2, plan)
        if mixing is not None:
            mixing = _SliceLocal.apply(mixing, 2, plan)  # the destination rows of this rank's heads
        return gates, mixing, routing

    def mix(self, attn: torch.Tensor, gates: torch.Tensor, mixing: Optional[torch.Tensor]) -> torch.Tensor:
        if mixing is None:
            return mix_heads(attn, gates, None)
        every_head = _GatherForLocal.apply(attn, 2, self.plan)  # flow reads other ranks' heads
        return mix_heads(every_head, None, mixing)


def _all_gather(local: torch.Tensor, dim: int, plan: TensorParallelPlan) -> torch.Tensor:
    pieces = [torch.empty_like(local) for _ in range(plan.n_ranks)]
    dist.all_gather(pieces, local.contiguous(), group=plan.group)
    return torch.cat(pieces, dim=dim)


def _own_slice(whole: torch.Tensor, dim: int, plan: TensorParallelPlan) -> torch.Tensor:
    return whole.chunk(plan.n_ranks, dim=dim)[plan.rank].contiguous()


class _GatherForReplicated(torch.autograd.Function):
    """All-gather along ``dim`` for a consumer that runs replicated (its gradient is whole and equal
    on every rank): the backward keeps this rank's slice, no exchange."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, dim: int, plan: TensorParallelPlan) -> torch.Tensor:
        ctx.dim, ctx.plan = dim, plan
        plan.traffic.all_gather(local)
        return _all_gather(local, dim, plan)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _own_slice(grad, ctx.dim, ctx.plan), None, None


class _GatherForLocal(_GatherForReplicated):
    """All-gather along ``dim`` (the same forward) for a consumer that differs per rank (each
    rank's gradient is a partial sum): the backward sums the ranks' gradients and keeps this
    rank's slice."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        plan, dim = ctx.plan, ctx.dim
        if dist.get_backend(plan.group) == "gloo":  # gloo has no reduce-scatter
            plan.traffic.all_reduce(grad, backward=True)
            grad = grad.contiguous()
            dist.all_reduce(grad, group=plan.group)
            return _own_slice(grad, dim, plan), None, None
        plan.traffic.reduce_scatter(grad, backward=True)
        pieces = grad.movedim(dim, 0).contiguous()
        out = pieces.new_empty(pieces.shape[0] // plan.n_ranks, *pieces.shape[1:])
        dist.reduce_scatter_tensor(out, pieces, group=plan.group)
        return out.movedim(0, dim), None, None


class _SliceLocal(torch.autograd.Function):
    """This rank's slice along ``dim`` of a tensor computed replicated; the backward all-gathers the
    slices' gradients, so the replicated producer gets the whole gradient on every rank."""

    @staticmethod
    def forward(ctx, whole: torch.Tensor, dim: int, plan: TensorParallelPlan) -> torch.Tensor:
        ctx.dim, ctx.plan = dim, plan
        return _own_slice(whole, dim, plan)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.plan.traffic.all_gather(grad, backward=True)
        return _all_gather(grad, ctx.dim, ctx.plan), None, None


# ---------------------------------------------------------------------- training helpers
def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """``optimizer.state_dict()`` with every sharded parameter's moments full, in the single-process
    row order (a collective), so it loads under any layout."""
    plan = tensor_parallel_plan(model)
    if plan is None:
        return state
    return map_parameter_state(model, optimizer, state, _owners(model, plan),
                               lambda tensor, layout: layout.full(tensor))


def local_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """The reverse of :func:`full_optimizer_state`: this rank's shard of every sharded moment."""
    plan = tensor_parallel_plan(model)
    if plan is None:
        return state
    return map_parameter_state(model, optimizer, state, _owners(model, plan),
                               lambda tensor, layout: tensor if _is_dtensor(tensor) else layout.local(tensor))


def _owners(model: nn.Module, plan: TensorParallelPlan) -> Dict[int, ShardLayout]:
    return {id(p): plan.layouts[id(p)] for p in model.parameters() if id(p) in plan.layouts}
