"""Head router: PyG propagate path vs fused path vs an independent dense einsum reference;
two-stage top-k gating; routing losses against their formulas; aux-loss-free bias."""

import math

import pytest
import torch
from torch_geometric.nn import MessagePassing

from gohgraph import GoHConfig
from gohgraph.graph import head_graph
from gohgraph.models.block import build_attention
from gohgraph.routers.heads import HeadGate, HeadRouter
from gohgraph.routers.losses import load_balance_loss, router_z_loss
from tests.references import einsum_head_router


def make_router(graph="complete", heads=8, rounds=2, head_dim=12, feat=16, seed=0):
    torch.manual_seed(seed)
    router = HeadRouter(head_dim, heads, head_graph(graph, heads), feat, rounds)
    with torch.no_grad():  # larger scores than the near-uniform init, so paths are really tested
        router.score.weight.normal_(std=1.0)
        router.round_bias.normal_(std=0.5)
    return router


def close_in_float32(actual, expected):
    """Equal up to float32 rounding of sums: 1e-5 relative to the tensor's own scale."""
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(scale, 1e-3))


def test_router_is_a_pyg_message_passing_layer():
    assert isinstance(make_router(), MessagePassing)


@pytest.mark.parametrize("graph", ["complete", "ring", "star", "none"])
@pytest.mark.parametrize("rounds", [1, 3])
def test_pyg_fused_and_einsum_paths_agree_forward(graph, rounds):
    router = make_router(graph, rounds=rounds)
    q = torch.randn(37, 8, 12)
    logits_pyg, edges_pyg = router(q, fused=False)
    logits_fused, edges_fused = router(q, fused=True)
    logits_ref, edges_ref = einsum_head_router(router, q)
    close_in_float32(logits_fused, logits_pyg)
    close_in_float32(edges_fused, edges_pyg)
    close_in_float32(logits_fused, logits_ref)
    close_in_float32(edges_fused, edges_ref)
    # attention over in-edges: the non-self-loop weights into each head sum to at most 1
    if edges_fused.numel():
        into = torch.zeros(37, 8).index_add_(1, router.edge_index[1], edges_fused)
        assert (into <= 1 + 1e-6).all() and (into > 0).any()


@pytest.mark.parametrize("graph", ["complete", "star"])
def test_pyg_and_fused_paths_agree_on_gradients(graph):
    router = make_router(graph, rounds=2)
    q = torch.randn(23, 8, 12)
    weights = torch.randn(23, 8), torch.randn(23, router.edge_index.shape[1])

    def grads(fused):
        router.zero_grad()
        q_in = q.clone().requires_grad_()
        logits, edges = router(q_in, fused=fused)
        ((logits * weights[0]).sum() + (edges * weights[1]).sum()).backward()
        return [q_in.grad] + [p.grad.clone() for p in router.parameters()]

    for fused_grad, pyg_grad in zip(grads(True), grads(False)):
        close_in_float32(fused_grad, pyg_grad)


def test_head_graph_is_the_same_edge_index_for_every_token():
    router = make_router("ring")
    q = torch.randn(5, 8, 12)
    single = torch.stack([router(q[i:i + 1])[0][0] for i in range(5)])
    torch.testing.assert_close(router(q)[0], single, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- gating
def gate_for(n_heads=8, shared=2, top_k=3, aux_free=False, d_model=16, normalisation="moh"):
    cfg = GoHConfig(d_model=d_model * 1, n_heads=n_heads, n_shared_heads=shared, top_k_heads=top_k,
                    router="linear", aux_free_bias=aux_free, bias_update_rate=0.1,
                    head_gate_normalisation=normalisation)
    return HeadGate(cfg)


def test_gates_have_exactly_shared_plus_top_k_nonzero_and_shared_always_on():
    gate = gate_for()
    torch.manual_seed(1)
    logits = torch.randn(500, 8) * 3
    active = gate(torch.randn(500, 16), logits).gates > 0
    assert (active.sum(-1) == 5).all()
    assert active[:, :2].all()
    # routed heads chosen are the three largest routed logits
    expected = torch.zeros(500, 6, dtype=torch.bool).scatter(1, logits[:, 2:].topk(3).indices, True)
    assert torch.equal(active[:, 2:], expected)


@pytest.mark.parametrize("normalisation", ["moh", "mha"])
def test_gates_follow_the_two_stage_formula(normalisation):
    gate = gate_for(normalisation=normalisation)
    with torch.no_grad():
        gate.stage_mix.weight.normal_()
    x, logits = torch.randn(7, 16), torch.randn(7, 8)
    gates = gate(x, logits).gates
    bias = gate.stage_mix.bias if normalisation == "mha" else 0.0
    mix = torch.softmax(x @ gate.stage_mix.weight.t() + bias, dim=-1)
    shared = mix[:, :1] * torch.softmax(logits[:, :2], -1)
    routed_logits = logits[:, 2:]
    kept = routed_logits.topk(3).indices
    routed = torch.zeros(7, 6)
    for t in range(7):
        p = torch.softmax(routed_logits[t, kept[t]], -1)
        routed[t, kept[t]] = mix[t, 1] * p
    if normalisation == "mha":  # the gates always sum to H_s + k = 5
        expected = torch.cat([shared, routed], -1) * 5
        torch.testing.assert_close(gates.sum(-1), torch.full((7,), 5.0))
    else:  # MoH: stage weights 2 softmax, shared x H_s = 2, routed x k = 3
        expected = torch.cat([2 * 2 * shared, 2 * 3 * routed], -1)
    torch.testing.assert_close(gates, expected, rtol=1e-5, atol=1e-6)


def test_uniform_logits_give_gate_one_on_every_active_head():
    gate = gate_for(shared=2, top_k=6)
    gates = gate(torch.randn(4, 16), torch.zeros(4, 8)).gates
    torch.testing.assert_close(gates, torch.ones(4, 8))


def test_load_balance_loss_matches_formula_on_hand_made_example():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    selected = torch.tensor([[0, 1], [0, 1], [2, 0], [0, 1]])
    # by hand: counts (4, 3, 1) of 8 selections; mean probs (0.475, 0.225, 0.3)
    expected = 3 * (4 / 8 * 0.475 + 3 / 8 * 0.225 + 1 / 8 * 0.3)
    assert load_balance_loss(probs, selected, 3).item() == pytest.approx(expected, rel=1e-6)
    uniform = torch.full((6, 3), 1 / 3)
    assert load_balance_loss(uniform, torch.tensor([[0], [1], [2], [0], [1], [2]]), 3).item() == pytest.approx(1.0)


def test_z_loss_matches_formula():
    assert router_z_loss(torch.zeros(5, 6)).item() == pytest.approx(math.log(6) ** 2, rel=1e-6)
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    expected = (math.log(math.e + math.e ** 2 + math.e ** 3) ** 2 + math.log(1 + math.e ** -1 + math.e ** 4) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_gate_reports_both_losses_for_routed_heads():
    gate = gate_for()
    logits = torch.randn(10, 8)
    aux = gate(torch.randn(10, 16), logits).aux_losses
    routed = logits[:, 2:]
    expected_balance = load_balance_loss(torch.softmax(routed, -1), routed.topk(3).indices, 6)
    torch.testing.assert_close(aux["head_balance"], expected_balance)
    torch.testing.assert_close(aux["head_z"], (torch.logsumexp(routed, -1) ** 2).mean())


def test_aux_free_bias_moves_load_toward_uniform():
    gate = gate_for(shared=0, top_k=1, aux_free=True)
    gate.train()
    torch.manual_seed(0)
    skew = torch.tensor([2.0, 1.0, 0, 0, 0, 0, 0, 0])  # head 0 wins nearly every token
    loads = []
    for _ in range(30):
        logits = torch.randn(256, 8) * 0.5 + skew
        load = (gate(torch.randn(256, 16), logits).gates > 0).float().sum(0)
        loads.append(load.std().item() / load.mean().item())
        gate.update_bias()
    assert loads[-1] < 0.5 * loads[0]
    assert gate.selection_bias[0] < 0 < gate.selection_bias[-1]


@pytest.mark.parametrize("fused", [True, False])
def test_dense_edge_weights_hold_the_per_edge_weights_and_nothing_else(fused):
    router = make_router("star")
    q = torch.randn(11, 8, 12)
    _, per_edge = router(q, fused=fused)
    _, dense = router(q, fused=fused, dense_weights=True)
    expected = torch.zeros(11, 8, 8)
    src, dst = router.edge_index
    expected[:, dst, src] = per_edge
    torch.testing.assert_close(dense, expected)


def test_graph_router_with_token_logits_contains_moh():
    """``router_token_logits`` adds MoH's linear logits to GoH's: with the graph's scores zeroed and
    no flow, a GoH layer is exactly a MoH layer with the same weights."""
    shape = dict(d_model=32, n_heads=4, n_shared_heads=1, top_k_heads=2, router_dim=8, router_rounds=1,
                 max_seq_len=16, n_layers=1)
    moh = build_attention(GoHConfig(router="linear", **shape), 0)
    goh = build_attention(GoHConfig(router="graph", inter_head_flow=False, router_token_logits=True, **shape), 0)
    with torch.no_grad():
        goh.head_routing.router.score.weight.zero_()
        goh.head_routing.router.head_bias.zero_()
        moh.head_routing.router.proj.weight.normal_(std=1.0)  # clearly separated logits: the top-k is not a coin toss
    goh.head_routing.token_router.load_state_dict(moh.head_routing.router.state_dict())
    for name in ("qkv", "out"):
        getattr(goh, name).load_state_dict(getattr(moh, name).state_dict())
    goh.head_routing.gate.load_state_dict(moh.head_routing.gate.state_dict())
    x = torch.randn(2, 9, 32)
    (y_goh, r_goh), (y_moh, r_moh) = goh(x), moh(x)
    torch.testing.assert_close(r_goh.head_gates, r_moh.head_gates)
    torch.testing.assert_close(y_goh, y_moh)
    assert (r_goh.head_gates > 0).sum(-1).eq(3).all()  # 1 shared + top-2 routed
