"""The seams other features plug into, each exercised with a second implementation swapped in:
``make_linear``, position schemes, the KV-cache interface; attention's ``mask``, ``causal`` and
``memory`` arguments against a plain reference."""

import math

import pytest
import torch
from torch import nn

from gohgraph import DynamicKVCache, GoHConfig, GoHTransformer, KVCache
from gohgraph.layers import linear as linear_module
from gohgraph.layers import positions as positions_module
from gohgraph.models.block import build_attention

CFG = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)


class CountingLinear(nn.Linear):
    """An nn.Linear that counts its calls: a stand-in for another kind of projection (BitLinear)."""

    calls = 0

    def forward(self, x):
        CountingLinear.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("changes", [dict(router="graph", n_shared_heads=1, top_k_heads=2),
                                     dict(ffn="graph-moe", n_subtokens=2, n_experts=4, n_shared_experts=1),
                                     dict(position_embedding="learned", mlp="gelu", linear_bias=True, tie_embeddings=False)])
def test_every_projection_comes_from_make_linear(monkeypatch, changes):
    monkeypatch.setitem(linear_module.LINEAR_KINDS, linear_module.DEFAULT_LINEAR,
                        lambda d_in, d_out, bias: CountingLinear(d_in, d_out, bias=bias))
    model = GoHTransformer(GoHConfig(**CFG, **changes))
    projections = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    # only the routers (float32, never quantised) and the untied output head stay plain nn.Linear
    assert all(".router." in name or ".token_router." in name or "stage_mix" in name or name == "lm_head"
               for name in projections), projections
    swapped = [name for name, module in model.named_modules() if isinstance(module, CountingLinear)]
    assert any(name.endswith("attn.qkv") for name in swapped) and any(name.endswith("attn.out") for name in swapped)
    CountingLinear.calls = 0
    model(torch.randint(0, 64, (2, 8)))
    assert CountingLinear.calls >= len(swapped)


class RecordingRotation(nn.Module):
    """A position scheme that leaves q and k alone and records the offsets it was asked for."""

    def __init__(self, cfg):
        super().__init__()
        self.offsets = []

    def forward(self, q, k, offset):
        self.offsets.append(offset)
        return q, k


def test_position_schemes_are_looked_up_not_hard_coded(monkeypatch):
    monkeypatch.setitem(positions_module.POSITION_SCHEMES, "rope",
                        positions_module.PositionScheme(RecordingRotation, positions_module.ON_QUERIES_KEYS))
    model = GoHTransformer(GoHConfig(**CFG)).eval()
    rotations = [block.attn.rotary for block in model.blocks]
    assert all(isinstance(rotation, RecordingRotation) for rotation in rotations)
    model.generate(torch.randint(0, 64, (1, 5)), max_new_tokens=3, temperature=0)
    assert rotations[0].offsets == [0, 5, 6]
    # without any rotation one attention layer is blind to order: a permuted prefix gives the same last logits
    one_layer = GoHTransformer(GoHConfig(**{**CFG, "n_layers": 1})).eval()
    ids = torch.randint(0, 64, (1, 6))
    permuted = torch.cat([ids[:, :5].flip(1), ids[:, 5:]], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(one_layer(ids).logits[:, -1], one_layer(permuted).logits[:, -1])


def test_learned_positions_are_added_once_to_the_embedding():
    model = GoHTransformer(GoHConfig(**CFG, position_embedding="learned")).eval()
    assert all(block.attn.rotary is None for block in model.blocks)
    x = torch.zeros(1, 3, 32)
    torch.testing.assert_close(model.position_embed(x, 4), model.position_embed.weight[4:7].unsqueeze(0))
    per_row = torch.tensor([[0, 0, 1], [5, 6, 7]])  # left-padded rows count positions from their first token
    torch.testing.assert_close(model.position_embed(x.expand(2, 3, 32), per_row), model.position_embed.weight[per_row])
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model.position_embed(x, 30)


class PreallocatedKVCache(KVCache):
    """A second cache: fixed buffers written in place, as a static cache would be."""

    def __init__(self, n_layers, batch, kv_heads, head_dim, max_len):
        self.keys = torch.zeros(n_layers, batch, kv_heads, max_len, head_dim)
        self.values = torch.zeros_like(self.keys)
        self.lengths = [0] * n_layers

    def length(self, layer=0):
        return self.lengths[layer]

    def append(self, layer, keys, values):
        start, end = self.lengths[layer], self.lengths[layer] + keys.shape[2]
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        self.lengths[layer] = end
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


@pytest.mark.parametrize("router", ["dense", "graph"])
def test_a_second_kv_cache_decodes_like_the_dynamic_one_and_like_recompute(router):
    cfg = GoHConfig(**CFG, router=router, n_kv_heads=2, **({"n_shared_heads": 1, "top_k_heads": 2} if router == "graph" else {}))
    torch.manual_seed(0)
    model = GoHTransformer(cfg).eval()
    ids = torch.randint(0, 64, (2, 10))
    caches = [DynamicKVCache(cfg.n_layers), PreallocatedKVCache(cfg.n_layers, 2, cfg.kv_heads, cfg.head_dim, 16)]
    with torch.no_grad():
        full = model(ids).logits
        for cache in caches:
            steps = [model(ids[:, :4], cache=cache).logits]
            steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(4, 10)]
            torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def plain_attention(x, memory, qkv_weight, out_weight, heads, allowed):
    """Multi-head attention written out: queries from x, keys/values from memory, ``allowed [q, k]``."""
    batch, seq, d = x.shape
    hd = d // heads
    q = (x @ qkv_weight[:d].t()).view(batch, seq, heads, hd).transpose(1, 2)
    k, v = (memory @ qkv_weight[d:].t()).split([d, d], -1)
    k = k.view(batch, -1, heads, hd).transpose(1, 2)
    v = v.view(batch, -1, heads, hd).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(batch, seq, d) @ out_weight.t()


def test_cross_attention_reads_keys_and_values_from_memory():
    torch.manual_seed(0)
    attn = build_attention(GoHConfig(**CFG), 0)
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    y, _ = attn(x, causal=False, memory=memory)
    allowed = torch.ones(5, 7, dtype=torch.bool)
    torch.testing.assert_close(y, plain_attention(x, memory, attn.qkv.weight, attn.out.weight, 4, allowed))


def test_bidirectional_and_padding_masks_match_the_reference():
    torch.manual_seed(0)
    cfg = GoHConfig(**CFG, position_embedding="learned")  # no rotation, so the reference stays plain
    attn = build_attention(cfg, 0)
    x = torch.randn(2, 6, 32)
    keep = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])  # the second sequence is padded
    y, _ = attn(x, causal=False, mask=keep[:, None, None, :])
    allowed = keep[:, None, None, :].expand(2, 1, 6, 6)
    expected = plain_attention(x, x, attn.qkv.weight, attn.out.weight, 4, allowed)
    torch.testing.assert_close(y[keep], expected[keep])  # padding queries' own outputs are not used
    assert torch.isfinite(y).all()
    # padding is invisible: the unpadded prefix alone gives the same outputs
    y_short, _ = attn(x[1:, :4], causal=False)
    torch.testing.assert_close(y[1:, :4], y_short)
    # causal and a padding mask combine
    y_causal, _ = attn(x, causal=True, mask=keep[:, None, None, :])
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    expected = plain_attention(x, x, attn.qkv.weight, attn.out.weight, 4, allowed & causal)
    torch.testing.assert_close(y_causal[keep], expected[keep])


def test_attention_refuses_a_routed_config_without_its_routing():
    from gohgraph.layers.attention import GoHAttention

    with pytest.raises(ValueError, match="build_attention"):
        GoHAttention(GoHConfig(**CFG, router="linear", top_k_heads=2), 0)
