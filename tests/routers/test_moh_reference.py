"""router="linear" is MoH: the same weights give what SkyworkAI/MoH's released attention computes."""

import pytest
import torch

from gohgraph import GoHConfig
from gohgraph.models.block import build_attention
from tests.references import moh_attention, moh_llama3_head_mask, reference_mha


@pytest.mark.parametrize("heads,shared,top_k", [(8, 0, 4), (8, 1, 2), (8, 2, 4), (8, 4, 2), (8, 4, 4)])
def test_linear_router_equals_moh_released_attention(heads, shared, top_k):
    cfg = GoHConfig(d_model=32, n_heads=heads, n_shared_heads=shared, top_k_heads=top_k, router="linear",
                    position_embedding="learned", n_layers=1, max_seq_len=16)  # MoH-ViT has no RoPE
    torch.manual_seed(heads + shared + top_k)
    attn = build_attention(cfg, 0).train()
    routing = attn.head_routing
    generator = torch.Generator().manual_seed(0)
    wg = torch.randn(heads - shared, 32, generator=generator)  # MoH's routed-head router
    wg_1 = torch.randn(max(shared, 1), 32, generator=generator)  # MoH's shared-head router
    wg_0 = torch.randn(2, 32, generator=generator)  # MoH's stage weights
    with torch.no_grad():
        routing.router.proj.weight.copy_(torch.cat([wg_1[:shared], wg]))
        if routing.gate.two_stage:
            routing.gate.stage_mix.weight.copy_(wg_0)
    x = torch.randn(2, 9, 32, generator=generator)
    y, record = attn(x, causal=False)
    y_moh, gates_moh, l_aux = moh_attention(x, attn.qkv.weight, attn.out.weight, wg, wg_0, wg_1, heads, shared, top_k)
    torch.testing.assert_close(record.head_gates, gates_moh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_moh, rtol=1e-5, atol=1e-5)
    # our balance loss is MoH's l_aux / k: 1 at uniform load for any k (docs/routing.md)
    assert record.aux_losses["head_balance"].item() == pytest.approx(l_aux.item() / top_k, rel=1e-5)
    if shared and shared != top_k:  # MoH's gate mass varies per token; "mha" would always give H_s + k
        mass = record.head_gates.sum(-1)
        assert mass.max() - mass.min() > 1e-3
        assert ((mass >= 2 * min(shared, top_k) - 1e-4) & (mass <= 2 * max(shared, top_k) + 1e-4)).all()


def test_the_mha_normalisation_keeps_gates_summing_to_active_heads():
    cfg = GoHConfig(d_model=32, n_heads=8, n_shared_heads=2, top_k_heads=4, router="linear",
                    head_gate_normalisation="mha", n_layers=1, max_seq_len=16)
    torch.manual_seed(0)
    attn = build_attention(cfg, 0)
    with torch.no_grad():
        attn.head_routing.router.proj.weight.normal_()
        attn.head_routing.gate.stage_mix.weight.normal_()
    _, record = attn(torch.randn(2, 9, 32))
    torch.testing.assert_close(record.head_gates.sum(-1), torch.full((2, 9), 6.0))


@pytest.mark.parametrize("heads,shared,top_k", [(8, 0, 4), (8, 1, 2), (8, 2, 4), (8, 4, 2), (8, 4, 4)])
def test_query_norm_router_equals_moh_llama3_rule(heads, shared, top_k):
    """router="query-norm": MoH-LLaMA3's parameter-free head selection with 0/1 gates, on GQA + RoPE."""
    cfg = GoHConfig(d_model=32, n_heads=heads, n_kv_heads=2, n_shared_heads=shared, top_k_heads=top_k,
                    router="query-norm", n_layers=1, max_seq_len=16, rope_theta=500.0)
    torch.manual_seed(heads + shared + top_k)
    attn = build_attention(cfg, 0).eval()
    assert sum(p.numel() for p in attn.head_routing.parameters()) == 0  # parameter-free
    x = torch.randn(2, 9, 32)
    y, record = attn(x)
    q = (x @ attn.qkv.weight[:32].t()).view(2, 9, heads, 32 // heads)
    mask = moh_llama3_head_mask(q, shared, top_k)
    assert torch.equal(mask.sum(-1), torch.full((2, 9), float(shared + top_k)))
    if top_k < heads - shared:  # a real selection, different per token
        assert mask[..., shared:].std(dim=(0, 1)).max() > 0
    torch.testing.assert_close(record.head_gates, mask)
    heads_out = reference_mha(x, attn.qkv.weight, torch.eye(32), heads, 2, theta=500.0).view(2, 9, heads, -1)
    y_reference = (heads_out * mask.unsqueeze(-1)).reshape(2, 9, 32) @ attn.out.weight.t()
    torch.testing.assert_close(y, y_reference, rtol=1e-5, atol=1e-5)
    assert record.aux_losses == {}  # nothing to balance by gradient


def test_query_norm_router_selects_by_norm_and_rejects_nothing_silently():
    cfg = GoHConfig(d_model=16, n_heads=4, n_shared_heads=1, top_k_heads=1, router="query-norm",
                    n_layers=1, max_seq_len=8)
    attn = build_attention(cfg, 0)
    q = torch.zeros(1, 1, 4, 4)
    q[0, 0, :, 0] = torch.tensor([9.0, 1.0, 3.0, 2.0])  # the shared head's norm does not compete
    gates, _, record = attn.head_routing(torch.zeros(1, 1, 16), q)
    assert gates.flatten().tolist() == [1.0, 0.0, 1.0, 0.0]
    q_equal = torch.ones(1, 1, 4, 4)  # all norms equal: the std is 0 and logits stay finite
    _, _, record = attn.head_routing(torch.zeros(1, 1, 16), q_equal)
    assert torch.isfinite(record.head_logits).all()
