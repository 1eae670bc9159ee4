"""MoEFeedForward (SMoE, MH-MoE, GoH-MoE) against per-token references, and inside the model."""

import math

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.layers.kv_cache import DynamicKVCache
from gohgraph.layers.mlp import SwiGLU
from gohgraph.moe.layer import MoEFeedForward
from tests.references import reference_moe_layer

VARIANTS = {
    "moe": dict(ffn="moe", n_experts=6, n_shared_experts=1, top_k_experts=2),
    "moe-gelu": dict(ffn="moe", n_experts=5, top_k_experts=2, expert_activation="gelu"),
    "mh-moe": dict(ffn="mh-moe", n_experts=5, n_subtokens=4, top_k_experts=2),
    "mh-moe-unprojected": dict(ffn="mh-moe", n_experts=6, n_subtokens=2, top_k_experts=2, subtoken_projections=False),
    "graph-moe": dict(ffn="graph-moe", n_experts=7, n_shared_experts=2, n_subtokens=2, top_k_experts=2,
                      expert_graph=[[0, 0], [0, 1], [0, 2], [1, 2], [1, 3], [1, 4]]),
    # GMoE's expert <-> expert message passing before scoring
    "graph-moe-peers": dict(ffn="graph-moe", n_experts=6, n_subtokens=2, top_k_experts=2, expert_peer_graph="ring"),
}


def tiny_config(**changes):
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, expert_hidden=16)
    return GoHConfig(**{**base, **changes})


def sharpened_layer(cfg, seed=0):
    """A layer whose router gives clearly separated logits, so routing is not decided by rounding."""
    torch.manual_seed(seed)
    layer = MoEFeedForward(cfg)
    with torch.no_grad():
        for name, param in layer.router.named_parameters():
            if name in ("proj.weight", "query.weight"):
                param.mul_(100.0)
    return layer


# ---------------------------------------------------------------------- reference


@pytest.mark.parametrize("capacity_factor", [None, 0.6])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layer_matches_per_token_reference(variant, capacity_factor):
    cfg = tiny_config(**VARIANTS[variant], capacity_factor=capacity_factor)
    layer = sharpened_layer(cfg)
    x = torch.randn(2, 6, 32, requires_grad=True)
    y, routing = layer(x)
    y_ref, chosen = reference_moe_layer(layer, x)
    assert torch.equal(routing.expert_indices, chosen.reshape(routing.expert_indices.shape))
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-6)
    if capacity_factor is not None:
        assert routing.expert_drops.any()

    probe = torch.randn(y.shape)
    params = [x] + [p for p in layer.parameters()]
    grads = torch.autograd.grad((y * probe).sum(), params, allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), params, allow_unused=True)
    for got, want in zip(grads, grads_ref):
        if want is None:
            assert got is None or got.abs().sum() == 0
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_capacity_drops_are_counted_and_leave_only_the_residual():
    cfg = tiny_config(ffn="moe", n_experts=4, top_k_experts=1, capacity_factor=0.5)
    model = GoHTransformer(cfg)
    block = model.blocks[0]
    with torch.no_grad():
        block.ffn.router.proj.weight.mul_(100.0)
    x = torch.randn(3, 8, 32)
    out, routing = block(x)

    # independent count: walk the reported assignments in (position, rank) order against the capacity
    capacity = math.ceil(0.5 * 24 * 1 / 4)
    taken, expected = [0] * 4, torch.zeros(3, 8, 1, dtype=torch.bool)
    for b in range(3):
        for t in range(8):
            e = int(routing.expert_indices[b, t, 0, 0])
            expected[b, t, 0] = taken[e] >= capacity
            taken[e] += not expected[b, t, 0]
    assert torch.equal(routing.dropped, expected) and int(expected.sum()) > 0
    assert torch.equal(routing.expert_drops[..., 0], expected)

    ffn_out, _ = block.ffn(block.ffn_norm(x + block.attn(block.attn_norm(x))[0]))
    dropped = expected[..., 0]
    assert torch.equal(ffn_out[dropped], torch.zeros_like(ffn_out[dropped]))
    assert (ffn_out[~dropped].abs().sum(-1) > 0).all()
    residual = x + block.attn(block.attn_norm(x))[0]
    assert torch.equal(out[dropped], residual[dropped])


def test_capacity_binds_in_training_only_so_cached_decoding_matches_recompute():
    cfg = tiny_config(ffn="moe", n_experts=4, top_k_experts=1, capacity_factor=0.5)
    torch.manual_seed(0)
    model = GoHTransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:
            block.ffn.router.proj.weight.mul_(100.0)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    assert model.train()(ids).routing[0].dropped.any()
    assert not any(layer.dropped.any() for layer in model.eval()(ids).routing)
    recomputed = model(ids).logits
    cache = DynamicKVCache(cfg.n_layers)
    cached = [model(ids[:, :4], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                        for t in range(4, 12)]
    torch.testing.assert_close(torch.cat(cached, dim=1), recomputed, rtol=1e-4, atol=1e-5)


def test_dropless_drops_nothing():
    layer = sharpened_layer(tiny_config(ffn="moe", n_experts=4, top_k_experts=2))
    _, routing = layer(torch.randn(4, 8, 32))
    assert not routing.dropped.any() and not routing.expert_drops.any()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_subtoken_gets_top_k_distinct_experts_with_unit_weight(variant):
    cfg = tiny_config(**VARIANTS[variant])
    layer = sharpened_layer(cfg)
    _, routing = layer(torch.randn(2, 5, 32))
    m, k = cfg.n_subtokens, cfg.top_k_experts
    assert routing.expert_indices.shape == (2, 5, m, k) == routing.expert_weights.shape
    ids = routing.expert_indices
    assert ((ids >= 0) & (ids < cfg.n_routed_experts)).all()
    assert all(len(set(row)) == k for row in ids.reshape(-1, k).tolist())
    torch.testing.assert_close(routing.expert_weights.sum(-1), torch.ones(2, 5, m))
    assert set(routing.aux_losses) == {"expert_balance", "expert_z"}


def test_single_expert_top1_equals_dense_swiglu():
    cfg = tiny_config(ffn="moe", n_experts=1, top_k_experts=1, expert_hidden=24)
    layer = MoEFeedForward(cfg)
    dense = SwiGLU(cfg, 24)
    with torch.no_grad():
        layer.experts.w_in[0].copy_(dense.gate_up.weight.t())
        layer.experts.w_out[0].copy_(dense.down.weight.t())
    x = torch.randn(2, 7, 32)
    y, routing = layer(x)
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-7)
    assert torch.equal(routing.expert_weights, torch.ones(2, 7, 1, 1))


def test_mh_moe_without_projections_on_one_subtoken_is_smoe():
    """No head/merge layers and one sub-token leave exactly SMoE: same parameters, same output."""
    smoe = MoEFeedForward(tiny_config(ffn="moe", n_experts=6, n_shared_experts=1, top_k_experts=2))
    bare = MoEFeedForward(tiny_config(ffn="mh-moe", n_experts=6, n_shared_experts=1, top_k_experts=2,
                                      n_subtokens=1, subtoken_projections=False))
    assert not hasattr(bare, "head") and not hasattr(bare, "merge")
    bare.load_state_dict(smoe.state_dict())  # strict: the same parameter names and shapes
    x = torch.randn(2, 9, 32)
    (y_smoe, r_smoe), (y_bare, r_bare) = smoe(x), bare(x)
    torch.testing.assert_close(y_bare, y_smoe, rtol=0, atol=0)
    assert torch.equal(r_bare.expert_indices, r_smoe.expert_indices)


def test_subtoken_projections_cost_two_d_squared_per_layer():
    with_projections = GoHTransformer(tiny_config(**VARIANTS["mh-moe"]))
    without = GoHTransformer(tiny_config(**VARIANTS["mh-moe"], subtoken_projections=False))
    assert with_projections.num_parameters() - without.num_parameters() == 2 * 2 * 32 * 32  # 2 layers


def test_routing_is_identical_under_bf16_autocast():
    layer = MoEFeedForward(tiny_config(ffn="moe", n_experts=8, top_k_experts=2))
    x = torch.randn(2, 16, 32)
    _, routing = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf16, routing_bf16 = layer(x)
    assert torch.equal(routing.expert_indices, routing_bf16.expert_indices)
    assert routing_bf16.expert_weights.dtype == torch.float32 and torch.isfinite(y_bf16).all()


@pytest.mark.parametrize("variant", ["dense", "moe", "mh-moe", "graph-moe", "graph-moe-peers"])
def test_model_trains_with_every_ffn(variant):
    changes = {"dense": dict(ffn="dense")}.get(variant, VARIANTS.get(variant))
    cfg = tiny_config(**changes, router="linear", top_k_heads=2, aux_free_bias=True)
    torch.manual_seed(0)
    model = GoHTransformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(12):
        out = model(batch, labels=batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        model.update_routing_biases()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.7 * losses[0]
    if variant != "dense":
        gate = model.blocks[0].ffn.gate
        assert gate.load_since_update.sum() == 0  # folded in by update_routing_biases
        assert not torch.equal(gate.expert_load, torch.ones_like(gate.expert_load))
        assert gate.selection_bias.abs().sum() > 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_and_load_round_trip_keeps_experts_and_running_load(variant, tmp_path):
    cfg = tiny_config(**VARIANTS[variant], capacity_factor=1.5)
    model = GoHTransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:
            block.ffn.gate.expert_load.uniform_(0.5, 1.5)
            block.ffn.gate.selection_bias.uniform_(-0.1, 0.1)
    model.eval()
    ids = torch.randint(0, 64, (2, 10))
    expected = model(ids)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = GoHTransformer.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    got = loaded(ids)
    torch.testing.assert_close(got.logits, expected.logits)
    assert torch.equal(got.routing[0].expert_indices, expected.routing[0].expert_indices)
