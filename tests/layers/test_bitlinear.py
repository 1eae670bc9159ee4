"""BitLinear (BitNet b1.58) against an integer reference, its straight-through gradients, the BitNet
experts, and which modules of a ``linear="bitnet"`` model are quantised."""

import pytest
import torch
from torch import nn

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.layers import linear as linear_module
from gohgraph.layers.bitlinear import BitLinear, quantise_activations
from gohgraph.moe.experts import BitNetGroupedExperts, GroupedExperts

CFG = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)


def rms_normed(x, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def reference_bitlinear(x, weight, bias=None):
    """BitNet b1.58 written out with integers: int8 codes of the normed token, ternary codes of W,
    an exact integer matmul, then both scales."""
    xn = rms_normed(x)
    x_peak = xn.abs().amax(-1, keepdim=True)
    x_codes = torch.round(xn * 127 / x_peak).clamp(-128, 127).to(torch.int64)
    w_scale = weight.abs().mean()
    w_codes = torch.round(weight / w_scale).clamp(-1, 1).to(torch.int64)
    y = (x_codes @ w_codes.t()).double() * (x_peak.double() / 127) * w_scale.double()
    return (y if bias is None else y + bias.double()).float()


def test_quantised_weights_are_ternary_times_mean_abs():
    torch.manual_seed(0)
    layer = BitLinear(16, 8)
    q, gamma = layer.ternary("weight")
    assert gamma.item() == pytest.approx(layer.weight.abs().mean().item(), rel=1e-6)
    assert set(q.unique().tolist()) == {-1.0, 0.0, 1.0}
    w_q = layer.quantised_weight("weight")
    assert set((w_q / gamma).unique().tolist()) == {-1.0, 0.0, 1.0}


def test_activations_are_int8_per_token():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * torch.logspace(-2, 2, 5)[:, None]  # tokens of very different sizes
    x_q = quantise_activations(x)
    peak = rms_normed(x).abs().amax(-1, keepdim=True)
    codes = x_q * 127 / peak
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    assert codes.round().abs().max() == 127 and codes.round().min() >= -128
    assert len(torch.unique(codes.round())) <= 256


@pytest.mark.parametrize("bias", [False, True])
def test_forward_equals_the_integer_reference(bias):
    torch.manual_seed(0)
    layer = BitLinear(24, 12, bias=bias)
    x = torch.randn(4, 6, 24)
    torch.testing.assert_close(layer(x), reference_bitlinear(x, layer.weight.detach(), layer.bias),
                               rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_latent_weights_straight_through():
    torch.manual_seed(0)
    layer = BitLinear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    probe = torch.randn(5, 8)
    (layer(x) * probe).sum().backward()
    # STE: y = x_q W_q^T with dW = dy^T x_q, as if W_q were W; dx through the norm as if x_q were norm(x)
    x_q = quantise_activations(x.detach())
    torch.testing.assert_close(layer.weight.grad, probe.t() @ x_q)
    x_ref = x.detach().clone().requires_grad_()
    (rms_normed(x_ref) @ layer.quantised_weight("weight").detach().t() * probe).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6)


def test_bitnet_experts_quantise_each_expert_on_its_own():
    torch.manual_seed(0)
    experts = BitNetGroupedExperts(3, 16, 8, "swiglu", init_std=0.02, out_std=0.01)
    with torch.no_grad():  # experts of very different sizes: one shared scale would zero the small one
        experts.w_in.mul_(torch.tensor([0.1, 1.0, 10.0])[:, None, None])
    rows = torch.randn(7, 16)
    offsets = torch.tensor([2, 3, 7], dtype=torch.int32)
    out = experts(rows, offsets)
    expected = []
    for e, chunk in enumerate(rows.split([2, 1, 4])):
        gate, up = reference_bitlinear(chunk, experts.w_in[e].detach().t()).chunk(2, dim=-1)
        expected.append(reference_bitlinear(torch.nn.functional.silu(gate) * up, experts.w_out[e].detach().t()))
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-4, atol=1e-6)
    out.sum().backward()
    assert experts.w_in.grad.abs().sum() > 0 and experts.w_out.grad.abs().sum() > 0


def test_linear_kinds_are_the_config_choices():
    from gohgraph.config import LINEAR_KINDS

    assert set(linear_module.LINEAR_KINDS) == set(LINEAR_KINDS)
    with pytest.raises(ValueError, match=r"linear='ternary' is not one of \['standard', 'bitnet'\]"):
        GoHConfig(**CFG, linear="ternary")


@pytest.mark.parametrize("changes", [dict(ffn="dense"), dict(ffn="moe", n_experts=4, n_shared_experts=1),
                                     dict(ffn="mh-moe", n_subtokens=2, n_experts=4),
                                     dict(ffn="graph-moe", n_subtokens=2, n_experts=4, router="graph",
                                          n_shared_heads=1, top_k_heads=2, tie_embeddings=False)])
def test_bitnet_quantises_projections_and_experts_but_not_embeddings_head_or_routers(changes):
    model = GoHTransformer(GoHConfig(**CFG, linear="bitnet", **changes))
    kinds = {name: type(module) for name, module in model.named_modules()}
    assert kinds["embed"] is nn.Embedding
    assert model.lm_head is None or type(model.lm_head) is nn.Linear
    for name, kind in kinds.items():
        if name.endswith(("attn.qkv", "attn.out", "mlp.gate_up", "mlp.down", "ffn.head", "ffn.merge",
                          "shared_experts.w_in", "shared_experts.w_out")):
            assert kind is BitLinear, name
        if ".router" in name or "stage_mix" in name:
            assert kind is not BitLinear, name
        if name.endswith("ffn.experts"):
            assert kind is BitNetGroupedExperts
    assert not any(kind is GroupedExperts for kind in kinds.values())
    assert any(kind is BitLinear for kind in kinds.values())


@pytest.mark.parametrize("ffn", ["dense", "mh-moe"])
def test_a_bitnet_model_trains(ffn):
    torch.manual_seed(0)
    model = GoHTransformer(GoHConfig(**CFG, linear="bitnet", ffn=ffn, n_subtokens=2 if ffn == "mh-moe" else 1,
                                     n_experts=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.arange(16).repeat(4, 2)  # a pattern the model can learn
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
