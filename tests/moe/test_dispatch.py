"""Sparse dispatch (sort -> capacity -> grouped experts -> combine) against a per-assignment loop."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gohgraph.moe.dispatch import combine, dispatch, expert_capacity, plan_dispatch
from gohgraph.moe.experts import GroupedExperts
from gohgraph.ops.grouped_matmul import grouped_matmul
from tests.references import reference_drops, reference_moe


def random_routing(n_sub, n_experts, k, generator):
    """``[n_sub, k]`` distinct expert ids per row, and positive weights summing to 1."""
    ids = torch.stack([torch.randperm(n_experts, generator=generator)[:k] for _ in range(n_sub)])
    weights = torch.softmax(torch.randn(n_sub, k, generator=generator), dim=-1)
    return ids, weights


def sparse_moe(x, ids, weights, experts, capacity):
    plan = plan_dispatch(ids, experts.n_experts, capacity)
    out = experts(dispatch(x, plan), plan.group_offsets)
    return combine(out, plan, weights, x.shape[0]), plan


@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0])
@pytest.mark.parametrize("activation,d_model,dtype", [("swiglu", 16, torch.float32), ("gelu", 12, torch.float64)])
def test_sparse_dispatch_matches_per_assignment_loop(capacity_factor, activation, d_model, dtype):
    gen = torch.Generator().manual_seed(3)
    n_sub, n_experts, k, hidden = 40, 6, 2, 8
    torch.manual_seed(0)
    experts = GroupedExperts(n_experts, d_model, hidden, activation, init_std=0.3, out_std=0.3).to(dtype)
    x = torch.randn(n_sub, d_model, generator=gen, dtype=dtype, requires_grad=True)
    ids, weights = random_routing(n_sub, n_experts, k, gen)
    weights = weights.to(dtype).requires_grad_(True)
    capacity = expert_capacity(capacity_factor, n_sub, k, n_experts)
    drops = reference_drops(ids, n_experts, capacity)

    y, plan = sparse_moe(x, ids, weights, experts, capacity)
    y_ref = reference_moe(x, ids, weights, experts, drops)
    torch.testing.assert_close(y, y_ref)
    assert torch.equal(plan.assignment_dropped, drops)
    if capacity_factor == 0.5:
        assert drops.any(), "the test needs some overflow to mean anything"

    probe = torch.randn(y.shape, generator=gen, dtype=dtype)
    grads = torch.autograd.grad((y * probe).sum(), [x, weights, experts.w_in, experts.w_out])
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), [x, weights, experts.w_in, experts.w_out])
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)


def test_plan_groups_are_contiguous_and_capacity_exact():
    gen = torch.Generator().manual_seed(1)
    n_sub, n_experts, k = 50, 4, 2
    ids, _ = random_routing(n_sub, n_experts, k, gen)
    capacity = expert_capacity(0.6, n_sub, k, n_experts)
    assert capacity == math.ceil(0.6 * 50 * 2 / 4) == 15
    plan = plan_dispatch(ids, n_experts, capacity)
    load = torch.tensor([(ids == e).sum().item() for e in range(n_experts)])
    assert torch.equal(plan.expert_load, load)
    assert torch.equal(plan.group_sizes, load.clamp(max=capacity))
    assert plan.group_offsets.dtype == torch.int32 and int(plan.group_offsets[-1]) == plan.token_index.numel()
    # grouped rows come expert by expert, each group in flat (position, rank) order
    grouped_experts = ids.reshape(-1)[plan.assignment_index]
    assert torch.equal(grouped_experts, torch.repeat_interleave(torch.arange(n_experts), plan.group_sizes))
    for e in range(n_experts):
        members = plan.assignment_index[grouped_experts == e]
        assert torch.equal(members, members.sort().values)
    assert int(plan.assignment_dropped.sum()) == int((load - load.clamp(max=capacity)).sum())


def test_dropless_plan_keeps_everything():
    gen = torch.Generator().manual_seed(2)
    ids, _ = random_routing(30, 5, 3, gen)
    plan = plan_dispatch(ids, 5, capacity=None)
    assert not plan.assignment_dropped.any() and plan.capacity is None
    assert plan.token_index.numel() == 90


def test_fully_dropped_subtoken_gets_exact_zero():
    experts = GroupedExperts(2, 8, 4, "swiglu", init_std=0.5, out_std=0.5)
    ids = torch.tensor([[0], [0], [0], [1]])
    x = torch.randn(4, 8)
    y, plan = sparse_moe(x, ids, torch.ones(4, 1), experts, capacity=2)
    assert plan.subtoken_dropped.tolist() == [False, False, True, False]
    assert torch.equal(y[2], torch.zeros(8)) and y[0].abs().sum() > 0


@pytest.mark.parametrize("d_in,d_out", [(16, 24), (6, 5)])  # aligned: grouped_mm; unaligned: looped views
def test_grouped_matmul_matches_per_group_matmul(d_in, d_out):
    gen = torch.Generator().manual_seed(4)
    sizes = [3, 0, 7, 2]
    rows = torch.randn(sum(sizes), d_in, generator=gen, requires_grad=True)
    weights = torch.randn(len(sizes), d_in, d_out, generator=gen, requires_grad=True)
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    out = grouped_matmul(rows, weights, offsets)
    ref = torch.cat([chunk @ weights[e] for e, chunk in enumerate(rows.split(sizes))])
    torch.testing.assert_close(out, ref)
    # y.sum() sends an expanded (non-contiguous) gradient into grouped_mm's backward
    grads = torch.autograd.grad(out.sum(), [rows, weights])
    grads_ref = torch.autograd.grad(ref.sum(), [rows, weights])
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)
    assert grads[1][1].abs().sum() == 0  # the empty group gets no gradient


@settings(max_examples=40, deadline=None)
@given(n_sub=st.integers(1, 40), n_experts=st.integers(1, 7), data=st.data())
def test_plan_matches_reference_drops_for_any_routing(n_sub, n_experts, data):
    k = data.draw(st.integers(1, n_experts))
    seed = data.draw(st.integers(0, 2**16))
    capacity_factor = data.draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    ids, _ = random_routing(n_sub, n_experts, k, torch.Generator().manual_seed(seed))
    capacity = expert_capacity(capacity_factor, n_sub, k, n_experts)
    plan = plan_dispatch(ids, n_experts, capacity)
    drops = reference_drops(ids, n_experts, capacity)
    assert torch.equal(plan.assignment_dropped, drops)
    assert torch.equal(plan.subtoken_dropped, drops.all(dim=-1))
    kept = ~drops.reshape(-1)
    assert plan.token_index.numel() == int(kept.sum()) == int(plan.group_offsets[-1])
    assert torch.equal(plan.token_index, plan.assignment_index // k)
    assert sorted(plan.assignment_index.tolist()) == kept.nonzero().flatten().tolist()


class LoopDispatcher:
    """A second Dispatcher: no sort at all, one row per (sub-token, rank) in flat order, grouped by a
    stable per-expert scan; the layer must not care which one it is given."""

    def __init__(self, n_experts):
        self.n_experts = n_experts

    def dispatch(self, tokens, expert_ids, capacity_factor):
        capacity = expert_capacity(capacity_factor, expert_ids.shape[0], expert_ids.shape[1], self.n_experts)
        plan = plan_dispatch(expert_ids, self.n_experts, capacity)  # drops and counts: the documented rule
        rows, order = [], []
        for expert in range(self.n_experts):
            for flat in range(expert_ids.numel()):
                sub, rank = divmod(flat, expert_ids.shape[1])
                if int(expert_ids[sub, rank]) == expert and not plan.assignment_dropped[sub, rank]:
                    rows.append(tokens[sub])
                    order.append(flat)
        self.order = order
        grouped = torch.stack(rows) if rows else tokens.new_zeros(0, tokens.shape[1])
        return grouped, plan.group_offsets, plan

    def combine(self, expert_out, plan, weights):
        out = [torch.zeros_like(expert_out[0]) for _ in range(weights.shape[0])]
        for row, flat in zip(expert_out, self.order):
            sub, rank = divmod(flat, weights.shape[1])
            out[sub] = out[sub] + weights[sub, rank] * row
        return torch.stack(out)


@pytest.mark.parametrize("ffn", ["moe", "graph-moe"])
def test_moe_layer_computes_the_same_with_another_dispatcher(ffn):
    from gohgraph import GoHConfig
    from gohgraph.moe.layer import MoEFeedForward

    cfg = GoHConfig(d_model=32, n_heads=4, n_layers=1, ffn=ffn, n_experts=5, n_shared_experts=1, top_k_experts=2,
                    n_subtokens=2 if ffn == "graph-moe" else 1, capacity_factor=0.75)
    torch.manual_seed(0)
    layer = MoEFeedForward(cfg).train()
    x = torch.randn(2, 6, 32)
    y_local, routing_local = layer(x)
    layer.dispatcher = LoopDispatcher(layer.n_routed)
    y_loop, routing_loop = layer(x)
    torch.testing.assert_close(y_loop, y_local, rtol=1e-5, atol=1e-6)
    assert torch.equal(routing_loop.expert_drops, routing_local.expert_drops) and routing_local.expert_drops.any()


def test_slots_taken_by_earlier_assignments_continue_the_capacity_cut():
    """Two halves planned apart, the second told the slots the first used, drop exactly what one
    plan over the concatenation drops (expert parallelism's global capacity)."""
    torch.manual_seed(3)
    n_experts, k = 4, 2
    ids = torch.stack([torch.randperm(n_experts)[:k] for _ in range(30)])
    capacity = expert_capacity(0.6, 30, k, n_experts)
    whole = plan_dispatch(ids, n_experts, capacity)
    first = plan_dispatch(ids[:12], n_experts, capacity)
    second = plan_dispatch(ids[12:], n_experts, capacity, slots_taken=torch.bincount(ids[:12].reshape(-1),
                                                                                       minlength=n_experts))
    assert torch.equal(torch.cat([first.assignment_dropped, second.assignment_dropped]), whole.assignment_dropped)
    assert torch.equal(first.group_sizes + second.group_sizes, whole.group_sizes)
    assert whole.assignment_dropped.any()
