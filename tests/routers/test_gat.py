"""One GAT round (routers/gat.py): fused path == PyG propagate == a dense loop over destinations."""

import pytest
import torch
import torch.nn.functional as F

from gohgraph.routers.gat import LEAKY_RELU_SLOPE, GraphAttention

# 3 sources -> 4 destinations; destination 3 is reached by nobody
EDGES = torch.tensor([[0, 1, 2, 0, 2], [0, 0, 1, 2, 2]])


def loop_reference(h_src, score_src, score_dst, edges, n_dst):
    """For each destination, softmax over its in-edges of LeakyReLU(s_src + s_dst), then the weighted sum."""
    out = torch.zeros(h_src.shape[0], n_dst, h_src.shape[-1], dtype=h_src.dtype)
    for dst in range(n_dst):
        sources = [int(s) for s, d in edges.t().tolist() if d == dst]
        if not sources:
            continue
        logits = torch.stack([score_src[:, s, 0] + score_dst[:, dst, 0] for s in sources], dim=-1)
        alpha = torch.softmax(F.leaky_relu(logits, LEAKY_RELU_SLOPE), dim=-1)
        out[:, dst] = sum(alpha[:, i:i + 1] * h_src[:, s] for i, s in enumerate(sources))
    return out


@pytest.mark.parametrize("edges,n_src,n_dst", [(EDGES, 3, 4), (torch.tensor([[0, 1, 2] * 2, [0] * 3 + [1] * 3]), 3, 2)],
                         ids=["restricted", "complete"])
def test_fused_and_propagate_rounds_equal_the_loop(edges, n_src, n_dst):
    layer = GraphAttention(edges, n_src, n_dst)
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(5, n_src, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    s_src = torch.randn(5, n_src, 1, dtype=torch.float64, generator=generator, requires_grad=True)
    s_dst = torch.randn(5, n_dst, 1, dtype=torch.float64, generator=generator, requires_grad=True)
    expected = loop_reference(h, s_src, s_dst, edges, n_dst)
    fused, alpha_dense = layer.attend(h, s_src, s_dst, fused=True)
    propagated, alpha_edges = layer.attend(h, s_src, s_dst, fused=False)
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(propagated, expected)
    # the fused path's dense attention holds the propagate path's per-edge attention, zero elsewhere
    torch.testing.assert_close(alpha_dense[:, edges[1], edges[0]], alpha_edges)
    assert alpha_dense.sum().item() == pytest.approx(alpha_edges.sum().item())
    probe = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    grads = [torch.autograd.grad((out * probe).sum(), (h, s_src, s_dst)) for out in (fused, propagated, expected)]
    for got in grads[:2]:
        for a, b in zip(got, grads[2]):
            torch.testing.assert_close(a, b)


def test_both_routers_run_this_round():
    from gohgraph.routers.experts import BipartiteAttention
    from gohgraph.routers.heads import HeadRouter

    assert issubclass(HeadRouter, GraphAttention) and issubclass(BipartiteAttention, GraphAttention)
