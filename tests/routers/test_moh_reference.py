"""router="linear" is MoH: the same weights give what SkyworkAI/MoH's released attention computes."""

import pytest
import torch

from gohgraph import GoHConfig
from gohgraph.models.block import build_attention
from tests.references import moh_attention


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
    # our balance loss is MoH's l_aux / k: 1 at uniform load for any k (DESIGN.md §10)
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
