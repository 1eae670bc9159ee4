"""The head router's automatic path choice: fused ``[heads, heads]`` softmax for dense graphs, PyG
propagate for sparse ones, and the same logits, edge weights and gradients whichever runs."""

import pytest
import torch

from gohgraph.graph import head_graph
from gohgraph.ops.small_softmax import small_softmax
from gohgraph.routers.heads import HeadRouter, prefers_fused_path


def make_router(graph: str, heads: int, seed: int = 0) -> HeadRouter:
    torch.manual_seed(seed)
    router = HeadRouter(4, heads, head_graph(graph, heads), router_dim=8, rounds=2)
    with torch.no_grad():  # scores far from the near-uniform init, so the paths really differ if wrong
        router.score.weight.normal_(std=1.0)
        router.round_bias.normal_(std=0.5)
    return router


@pytest.mark.parametrize("graph, heads, expected_fused", [
    ("complete", 8, True), ("complete", 64, True), ("ring", 8, True), ("ring", 32, True),
    ("ring", 64, False), ("star", 64, False), ("none", 64, False), ("none", 8, True),
])
def test_automatic_choice_follows_graph_density(graph, heads, expected_fused):
    router = make_router(graph, heads)
    edges = router.edge_index.shape[1]
    assert router.fused is expected_fused
    # the rule: fused unless edges + self-loops fill at most 1/16 of the heads x heads matrix
    assert prefers_fused_path(edges, heads) is ((edges + heads) * 16 > heads * heads)


@pytest.mark.parametrize("graph, heads", [("ring", 64), ("star", 64), ("complete", 8), ("ring", 16)])
def test_automatic_path_equals_both_paths_forward_and_backward(graph, heads):
    router = make_router(graph, heads)
    q = torch.randn(19, heads, 4)
    weights = torch.randn(19, heads), torch.randn(19, router.edge_index.shape[1])

    def run(fused):
        router.zero_grad()
        q_leaf = q.clone().requires_grad_(True)
        logits, edge_weights = router(q_leaf, fused=fused)
        ((logits * weights[0]).sum() + (edge_weights * weights[1]).sum()).backward()
        grads = [q_leaf.grad] + [p.grad.clone() for p in router.parameters()]
        return logits.detach(), edge_weights.detach(), grads

    automatic, fused, propagate = run(None), run(True), run(False)
    for other in (fused, propagate):
        torch.testing.assert_close(automatic[0], other[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(automatic[1], other[1], rtol=1e-5, atol=1e-6)
        for mine, theirs in zip(automatic[2], other[2]):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def test_small_softmax_matches_torch_softmax_with_masks_and_gradients():
    torch.manual_seed(0)
    x = (3 * torch.randn(5, 7, 6)).requires_grad_(True)
    mask = (torch.rand(7, 6) < 0.3) & ~torch.eye(7, 6, dtype=torch.bool)  # every row keeps an entry
    grad = torch.randn(5, 7, 6)

    def softmax_and_grad(softmax):
        x.grad = None
        out = softmax(x.masked_fill(mask, float("-inf")), dim=-1)
        (out * grad).sum().backward()
        return out.detach(), x.grad.clone()

    ours, reference = softmax_and_grad(small_softmax), softmax_and_grad(torch.softmax)
    torch.testing.assert_close(ours[0], reference[0])
    torch.testing.assert_close(ours[1], reference[1])
    assert (ours[0][:, mask] == 0).all()
    torch.testing.assert_close(small_softmax(x.detach(), dim=1), torch.softmax(x.detach(), dim=1))


def test_inference_mode_skips_routing_losses_but_not_routing():
    from gohgraph import GoHConfig
    from gohgraph.routers.heads import HeadGate

    torch.manual_seed(0)
    gate = HeadGate(GoHConfig(d_model=16, n_heads=8, router="graph", n_shared_heads=2, top_k_heads=3))
    x, logits = torch.randn(11, 16), torch.randn(11, 8)
    with torch.no_grad():
        trained = gate(x, logits)
    with torch.inference_mode():
        decoding = gate(x, logits)
    assert set(trained.aux_losses) == {"head_balance", "head_z"} and decoding.aux_losses == {}
    torch.testing.assert_close(decoding.gates, trained.gates, rtol=0, atol=0)


def test_generate_returns_an_ordinary_tensor_that_autograd_accepts():
    from gohgraph import GoHConfig, GoHTransformer

    torch.manual_seed(0)
    model = GoHTransformer(GoHConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32,
                                     router="graph", n_shared_heads=1, top_k_heads=2)).train()
    prompt = torch.randint(0, 64, (2, 5))
    cached = model.generate(prompt, max_new_tokens=7, temperature=0)
    recomputed = model.generate(prompt, max_new_tokens=7, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed) and torch.equal(cached[:, :5], prompt)
    assert not cached.is_inference() and model.training
    out = model(cached, labels=cached)  # the generated ids can be trained on
    out.loss.backward()
    assert out.aux_loss > 0 and model.embed.weight.grad is not None
