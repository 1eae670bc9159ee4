"""GraphRecursionScorer (GoH as the recursion router): PyG propagate path == fused path == an
independent dense einsum reference; the expert-choice and token-choice routers read its outputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from gohgraph.graph import head_graph
from gohgraph.routers.heads import HeadRouter
from gohgraph.routers.recursion import ExpertChoiceRecursionRouter, GraphRecursionScorer, TokenChoiceRecursionRouter


def einsum_recursion_scores(scorer, h):
    """The scorer's math written from scratch: RMS-normalise the token, split it into heads, dense
    adjacency with self-loops, einsum GAT rounds, per-node scores for every output, mean over the nodes."""
    graph, heads = scorer.graph, scorer.n_heads
    batch, seq, d = h.shape
    h = h / torch.sqrt((h * h).mean(-1, keepdim=True) + scorer.eps)
    x = h.reshape(batch * seq, heads, d // heads)
    adjacency = torch.eye(heads, dtype=torch.bool)
    for src, dst in graph.edge_index.t().tolist():
        adjacency[dst, src] = True
    z = torch.einsum("nhd,fd->nhf", x, graph.node_in.weight) + graph.head_embedding
    for r in range(graph.rounds):
        m = torch.einsum("nhf,gf->nhg", z, graph.round_lin[r].weight)
        e = torch.einsum("nif,f->ni", m, graph.att_dst[r])[:, :, None] + \
            torch.einsum("njf,f->nj", m, graph.att_src[r])[:, None, :]
        alpha = torch.softmax(F.leaky_relu(e, 0.2).masked_fill(~adjacency, float("-inf")), dim=-1)  # [n, dst, src]
        z = z + F.gelu(torch.einsum("nij,njf->nif", alpha, m) + graph.round_bias[r])
    bias = graph.head_bias.reshape(heads, -1)  # [heads, outputs]
    node_scores = torch.einsum("nhf,of->nho", z, graph.score.weight) + bias
    return node_scores.mean(1).reshape(batch, seq, -1)


def make_scorer(graph="complete", n_outputs=3, heads=4, d_model=24, rounds=2, seed=0):
    torch.manual_seed(seed)
    scorer = GraphRecursionScorer(d_model, heads, head_graph(graph, heads), router_dim=8, rounds=rounds,
                                  n_outputs=n_outputs)
    with torch.no_grad():  # scores well away from the near-zero init, so every path is really tested
        scorer.graph.score.weight.normal_(std=1.0)
        scorer.graph.head_bias.normal_(std=0.5)
        scorer.graph.round_bias.normal_(std=0.5)
    return scorer


def close_in_float32(actual, expected):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(scale, 1e-3))


@pytest.mark.parametrize("n_outputs", [1, 3])
@pytest.mark.parametrize("graph", ["complete", "ring", "star", "none"])
def test_pyg_fused_and_einsum_paths_agree(graph, n_outputs):
    scorer = make_scorer(graph, n_outputs)
    assert isinstance(scorer.graph, HeadRouter)  # the head router's module, not a copy of it
    h = 0.05 * torch.randn(3, 7, 24)  # the residual stream's small scale; the scorer normalises it
    pyg, fused = scorer(h, fused=False), scorer(h, fused=True)
    reference = einsum_recursion_scores(scorer, h)
    assert fused.shape == (3, 7, n_outputs) and fused.dtype == torch.float32
    close_in_float32(fused, pyg)
    close_in_float32(fused, reference)
    assert fused.std() > 0.1  # not a near-constant that would match anything


def test_pyg_and_fused_paths_agree_on_gradients():
    scorer = make_scorer("star")
    h = torch.randn(2, 5, 24)
    weights = torch.randn(2, 5, 3)

    def grads(fused):
        scorer.zero_grad()
        h_in = h.clone().requires_grad_()
        (scorer(h_in, fused=fused) * weights).sum().backward()
        return [h_in.grad] + [p.grad.clone() for p in scorer.parameters()]

    for fused_grad, pyg_grad in zip(grads(True), grads(False)):
        close_in_float32(fused_grad, pyg_grad)


def test_one_output_keeps_the_head_routers_parameter_shapes():
    router = HeadRouter(6, 4, head_graph("ring", 4), 8, 1)
    scorer = make_scorer("ring", n_outputs=1, rounds=1)
    assert {name: p.shape for name, p in router.named_parameters()} == \
        {name: p.shape for name, p in scorer.graph.named_parameters()}


def test_expert_choice_takes_its_scores_from_the_graph_scorer():
    scorer = make_scorer(n_outputs=2)
    router = ExpertChoiceRecursionRouter(24, max_recursions=3, gate_scale=0.5, graph_scorer=scorer).train()
    assert len(router.scores) == 0  # no linear scores beside the graph
    h = torch.randn(2, 9, 24)
    previous = torch.ones(2, 9, dtype=torch.bool)
    reference = einsum_recursion_scores(scorer, h)
    for recursion in (1, 2):
        selected, gate, _ = router(h, recursion, previous)
        scores = reference[..., recursion - 1]
        capacity = math.ceil((3 - recursion) / 3 * 9)
        for b in range(2):  # the top ceil(beta T) of the still-going tokens by the graph's score
            going = [t for t in range(9) if previous[b, t]]
            best = sorted(going, key=lambda t: -scores[b, t].item())[:capacity]
            assert sorted(torch.nonzero(selected[b]).flatten().tolist()) == sorted(best)
        close_in_float32(gate, 0.5 * torch.sigmoid(scores))
        previous = selected


def test_token_choice_takes_its_depth_logits_from_the_graph_scorer():
    scorer = make_scorer(n_outputs=3)
    router = TokenChoiceRecursionRouter(24, max_recursions=3, graph_scorer=scorer)
    assert router.proj is None
    h = torch.randn(2, 9, 24)
    depth, gate, losses = router(h)
    probs = torch.softmax(einsum_recursion_scores(scorer, h), -1)
    assert torch.equal(depth, probs.argmax(-1) + 1)
    close_in_float32(gate, probs.max(-1).values)
    assert set(losses) == {"recursion_balance"}


def test_a_scorer_with_the_wrong_number_of_outputs_is_refused():
    with pytest.raises(ValueError, match=r"graph_scorer has 3 outputs; expert-choice needs max_recursions - 1 = 2"):
        ExpertChoiceRecursionRouter(24, max_recursions=3, gate_scale=1.0, graph_scorer=make_scorer(n_outputs=3))
    with pytest.raises(ValueError, match=r"graph_scorer has 2 outputs; token-choice needs max_recursions = 3"):
        TokenChoiceRecursionRouter(24, max_recursions=3, graph_scorer=make_scorer(n_outputs=2))
