"""Expert routers and gate: fused vs PyG paths, graph restrictions, top-k, losses, balancing bias."""

import math

import pytest
import torch

from gohgraph import GoHConfig
from gohgraph.graph import bipartite_adjacency, expert_graph, head_graph
from gohgraph.routers.experts import BipartiteAttention, ExpertGate, GraphExpertRouter, LinearExpertRouter
from tests.references import einsum_expert_router

# slot 0 reaches experts 0-2, slot 1 reaches 2-4, expert 5 is reached by nobody
RESTRICTED = [[0, 0], [0, 1], [0, 2], [1, 2], [1, 3], [1, 4]]


def graph_router(spec, n_sub=2, n_experts=6, rounds=2, load_feature=True, peers="none"):
    torch.manual_seed(0)
    edges = expert_graph(spec, n_sub, n_experts)
    router = GraphExpertRouter(d_sub=12, n_subtokens=n_sub, n_experts=n_experts, edge_index=edges,
                               router_dim=8, rounds=rounds, load_feature=load_feature, init_std=0.5,
                               peer_edge_index=head_graph(peers, n_experts))
    return router, edges


def gate_for(edges, n_sub, n_experts, **cfg_changes):
    cfg = GoHConfig(d_model=32, n_heads=4, ffn="graph-moe", n_experts=n_experts, n_subtokens=n_sub,
                    **cfg_changes)
    return ExpertGate(cfg, bipartite_adjacency(edges, n_sub, n_experts).t())


@pytest.mark.parametrize("spec,peers", [(None, "none"), (RESTRICTED, "none"), (None, "ring"),
                                         (RESTRICTED, [[0, 5], [5, 0], [1, 2], [3, 4]])])
def test_graph_router_fused_path_matches_propagate(spec, peers):
    router, _ = graph_router(spec, peers=peers)
    load = torch.tensor([2.0, 0.5, 1.0, 1.0, 0.8, 0.7])
    assert router(torch.randn(7, 2, 12), expert_load=load, fused=True).dtype == torch.float32
    # the two paths sum in different orders; float64 shows they compute the same function, where
    # float32 rounding alone differs by up to 3e-6 in a gradient (torch 2.13, PyG 2.8)
    router = router.double()
    sub = torch.randn(7, 2, 12, dtype=torch.float64, requires_grad=True)
    fused = router(sub, expert_load=load, fused=True)
    reference = router(sub, expert_load=load, fused=False)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    finite = torch.isfinite(reference)
    probe = torch.randn(fused.shape)
    params = [sub, *router.parameters()]
    grads = torch.autograd.grad((fused.where(finite, 0) * probe).sum(), params, allow_unused=True)
    grads_ref = torch.autograd.grad((reference.where(finite, 0) * probe).sum(), params, allow_unused=True)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec,peers", [(None, "ring"), (RESTRICTED, "complete"), (RESTRICTED, "none")])
def test_graph_router_equals_the_einsum_reference(spec, peers):
    """PyG path == fused path (test above) == a dense einsum restatement, with and without GMoE's
    expert <-> expert rounds, which change the logits."""
    router, _ = graph_router(spec, peers=peers)
    router = router.double()
    sub = torch.randn(5, 2, 12, dtype=torch.float64)
    load = torch.tensor([2.0, 0.5, 1.0, 1.0, 0.8, 0.7], dtype=torch.float64)
    reference = einsum_expert_router(router, sub, load)
    for fused in (True, False):
        torch.testing.assert_close(router(sub, expert_load=load, fused=fused), reference, rtol=1e-6, atol=1e-9)
    if peers != "none":
        router.among_experts = None  # the same weights without the peer step
        finite = torch.isfinite(reference)
        assert (router(sub, expert_load=load)[finite] - reference[finite]).abs().max() > 1e-3


def test_expert_peer_graph_config_is_checked_and_round_trips():
    cfg = GoHConfig(ffn="graph-moe", n_experts=6, n_subtokens=2, expert_peer_graph="[[0, 1], [1, 0]]")
    assert cfg.expert_peer_graph == [[0, 1], [1, 0]]
    assert GoHConfig.from_dict(cfg.to_dict()) == cfg
    assert GoHConfig(ffn="graph-moe", n_experts=6, n_subtokens=2, expert_peer_graph="ring").expert_peer_graph == "ring"
    with pytest.raises(ValueError, match="expert_peer_graph=.*needs ffn='graph-moe'"):
        GoHConfig(ffn="moe", expert_peer_graph="ring")
    with pytest.raises(ValueError, match=r"expert_peer_graph edge \[0, 6\] names a node outside 0..5"):
        GoHConfig(ffn="graph-moe", n_experts=8, n_shared_experts=2, expert_peer_graph=[[0, 6]])
    with pytest.raises(ValueError, match="expert_peer_graph='mesh' is not one of"):
        GoHConfig(ffn="graph-moe", expert_peer_graph="mesh")


def test_graph_router_forbids_non_edges():
    router, edges = graph_router(RESTRICTED)
    logits = router(torch.randn(5, 2, 12), expert_load=torch.ones(6))
    allowed = torch.zeros(2, 6, dtype=torch.bool)
    for slot, expert in RESTRICTED:
        allowed[slot, expert] = True
    assert torch.isneginf(logits[:, ~allowed]).all() and torch.isfinite(logits[:, allowed]).all()


def test_bipartite_attention_destination_without_edges_gets_no_message():
    torch.manual_seed(0)
    edges = torch.tensor([[0, 1], [0, 0]])  # src 0 and 1 -> dst 0; dst 1 has no in-edge
    layer = BipartiteAttention(4, edges, n_src=2, n_dst=2)
    x_src, x_dst = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    for fused in (True, False):
        out = layer(x_src, x_dst, fused=fused)
        torch.testing.assert_close(out[:, 1], x_dst[:, 1] + torch.nn.functional.gelu(layer.bias))
    # dst 0: softmax over its two sources, computed by hand
    h = layer.lin(x_src)
    scores = torch.nn.functional.leaky_relu(h @ layer.att_src + (x_dst[:, :1] @ layer.att_dst), 0.2)
    expected = x_dst[:, 0] + torch.nn.functional.gelu((torch.softmax(scores, -1).unsqueeze(-1) * h).sum(1) + layer.bias)
    torch.testing.assert_close(layer(x_src, x_dst)[:, 0], expected)


def test_load_feature_changes_logits_only_when_enabled():
    sub = torch.randn(4, 2, 12)
    with_load, _ = graph_router(None, load_feature=True)
    without_load, _ = graph_router(None, load_feature=False)
    skewed = torch.tensor([3.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    assert not torch.allclose(with_load(sub, skewed), with_load(sub, torch.ones(6)))
    torch.testing.assert_close(without_load(sub, skewed), without_load(sub, torch.ones(6)))


def test_routers_compute_in_float32_under_bf16_autocast():
    router, _ = graph_router(None)
    linear = LinearExpertRouter(12, 6)
    sub = torch.randn(4, 2, 12).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert router(sub, torch.ones(6)).dtype == torch.float32
        assert linear(sub).dtype == torch.float32


@pytest.mark.parametrize("spec", [None, RESTRICTED])
def test_gate_selects_k_distinct_allowed_experts_with_unit_weight_sum(spec):
    edges = expert_graph(spec, 2, 6)
    gate = gate_for(edges, 2, 6, top_k_experts=2, aux_free_bias=True)
    gate.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 100.0]))  # tempts every slot to expert 5
    choice = gate(torch.randn(9, 2, 6))
    assert choice.indices.shape == (9, 2, 2)
    assert (choice.indices[..., 0] != choice.indices[..., 1]).all()
    torch.testing.assert_close(choice.weights.sum(-1), torch.ones(9, 2))
    allowed = bipartite_adjacency(edges, 2, 6).t()
    slots = torch.arange(2).view(1, 2, 1).expand_as(choice.indices)
    assert allowed[slots, choice.indices].all()
    if spec is None:
        assert (choice.indices == 5).any(dim=-1).all()  # the bias does decide selection when allowed


def test_gate_bias_selects_but_does_not_weight():
    edges = expert_graph(None, 1, 4)
    gate = gate_for(edges, 1, 4, top_k_experts=2, aux_free_bias=True)
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    gate.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    choice = gate(logits)
    assert sorted(choice.indices.flatten().tolist()) == [0, 3]
    kept = torch.tensor([2.0, -1.0])
    expected = torch.softmax(kept, 0)
    order = choice.indices.flatten().tolist()
    got = dict(zip(order, choice.weights.flatten().tolist()))
    assert math.isclose(got[0], expected[0].item(), rel_tol=1e-6)
    assert math.isclose(got[3], expected[1].item(), rel_tol=1e-6)


def test_gate_losses_on_hand_made_example():
    # E=2, k=1: softmax([ln 3, 0]) = [3/4, 1/4]; two tokens pick expert 0, one picks expert 1
    edges = expert_graph(None, 1, 2)
    gate = gate_for(edges, 1, 2, top_k_experts=1).eval()
    ln3 = math.log(3.0)
    logits = torch.tensor([[ln3, 0.0], [ln3, 0.0], [0.0, ln3]]).view(3, 1, 2)
    aux = gate(logits).aux_losses
    # f = [2/3, 1/3], P = [1.75/3, 1.25/3]: L_b = 2 * (3.5/9 + 1.25/9) = 19/18
    assert math.isclose(aux["expert_balance"].item(), 19 / 18, rel_tol=1e-6)
    assert math.isclose(aux["expert_z"].item(), math.log(4.0) ** 2, rel_tol=1e-6)


def test_gate_balance_loss_is_one_at_uniform_load_and_z_loss_at_zero_logits():
    edges = expert_graph(None, 1, 4)
    gate = gate_for(edges, 1, 4, top_k_experts=2).eval()
    logits = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]).view(2, 1, 4)
    assert math.isclose(gate(logits).aux_losses["expert_balance"].item(), 1.0, rel_tol=1e-6)
    assert math.isclose(gate(torch.zeros(5, 1, 4)).aux_losses["expert_z"].item(), math.log(4.0) ** 2, rel_tol=1e-6)


def test_aux_free_bias_moves_load_toward_uniform():
    edges = expert_graph(None, 1, 4)
    gate = gate_for(edges, 1, 4, top_k_experts=1, aux_free_bias=True,
                    bias_update_rate=0.05).train()
    gen = torch.Generator().manual_seed(0)
    logits = (torch.tensor([1.0, 0.5, 0.0, -0.5]) + 0.5 * torch.randn(512, 4, generator=gen)).view(512, 1, 4)

    def imbalance():  # (max - min) / mean of the load this step
        load = torch.bincount(gate(logits).indices.flatten(), minlength=4).float()
        return ((load.max() - load.min()) / load.mean()).item()

    start = imbalance()
    gate.load_since_update.zero_()
    for _ in range(30):
        gate(logits)
        gate.update_bias()
    end = imbalance()
    assert start > 1.0 and end < 0.25 * start
    assert gate.selection_bias[0] < 0 < gate.selection_bias[3]


def test_running_load_tracks_relative_load():
    edges = expert_graph(None, 1, 2)
    gate = gate_for(edges, 1, 2, top_k_experts=1).train()
    gate(torch.tensor([[5.0, 0.0]] * 3 + [[0.0, 5.0]]).view(4, 1, 2))  # load 3:1 -> relative [1.5, 0.5]
    gate.update_bias()
    m = ExpertGate.LOAD_MOMENTUM
    torch.testing.assert_close(gate.expert_load, torch.tensor([m + (1 - m) * 1.5, m + (1 - m) * 0.5]))
    assert gate.load_since_update.sum() == 0
    assert torch.equal(gate.selection_bias, torch.zeros(2))  # no aux-free bias configured


def test_bad_expert_graphs_raise_value_error():
    with pytest.raises(ValueError, match="expert_graph"):
        expert_graph([[0, 6]], 2, 6)  # routed experts are 0..5
    edges = expert_graph([[0, 0], [1, 1], [1, 2]], 2, 6)
    with pytest.raises(ValueError, match="top_k_experts=2"):
        gate_for(edges, 2, 6, top_k_experts=2)  # slot 0 reaches only one expert


def test_config_rejects_expert_graph_naming_a_shared_expert():
    with pytest.raises(ValueError, match="routed experts 0..5"):
        GoHConfig(ffn="graph-moe", n_experts=8, n_shared_experts=2, n_subtokens=2, expert_graph=[[0, 6]])
