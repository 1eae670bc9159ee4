"""Sliding windows, ALiBi, RoPE scaling and the decode caches, each against a reference written here."""

import math

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.layers.kv_cache import SlidingWindowKVCache, StaticKVCache, StaticSlotWriter
from gohgraph.layers.positions import alibi_slopes, rope_inverse_frequencies
from gohgraph.models.block import build_attention

CFG = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
ROUTED = {"dense": {}, "linear": dict(n_shared_heads=1, top_k_heads=2),
          "graph": dict(n_shared_heads=1, top_k_heads=2), "query-norm": dict(n_shared_heads=1, top_k_heads=2)}


def masked_attention(x, qkv_weight, out_weight, heads, allowed, bias=None, rope=None):
    """Multi-head attention written out: ``allowed [q, k]`` bool, ``bias [heads, q, k]`` added to the
    scores, ``rope(t)`` applied to q and k ``[batch, heads, seq, head_dim]``."""
    batch, seq, d = x.shape
    hd = d // heads
    q, k, v = (x @ qkv_weight.t()).split([d, d, d], -1)
    q, k, v = (t.view(batch, seq, heads, hd).transpose(1, 2) for t in (q, k, v))
    if rope is not None:
        q, k = rope(q), rope(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(batch, seq, d) @ out_weight.t()


def rope_with(inv_freq, positions):
    angles = torch.outer(positions.float(), inv_freq)
    cos, sin = angles.cos(), angles.sin()

    def rotate(t):
        a, b = t[..., :t.shape[-1] // 2], t[..., t.shape[-1] // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
    return rotate


# ---------------------------------------------------------------------- sliding window
@pytest.mark.parametrize("window", [1, 3, 6])
def test_sliding_window_equals_a_banded_causal_reference(window):
    cfg = GoHConfig(**CFG, sliding_window=window, position_embedding="learned")
    torch.manual_seed(0)
    attn = build_attention(cfg, 0)
    x = torch.randn(2, 10, 32)
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    allowed = (j <= i) & (i - j < window)
    reference = masked_attention(x, attn.qkv.weight, attn.out.weight, 4, allowed)
    torch.testing.assert_close(attn(x)[0], reference, rtol=1e-5, atol=1e-5)
    if window < 10:  # the window changes the function
        full = masked_attention(x, attn.qkv.weight, attn.out.weight, 4, j <= i)
        assert (reference - full).abs().max() > 1e-3


def test_sliding_window_cache_holds_w_minus_1_positions():
    cache = SlidingWindowKVCache(1, window=4)
    for t in range(9):
        keys, _ = cache.append(0, torch.full((1, 2, 1, 3), float(t)), torch.zeros(1, 2, 1, 3))
        assert keys[0, 0, :, 0].tolist() == [float(p) for p in range(max(0, t - 3), t + 1)]
    assert cache.length() == 9 and cache.stored() == 3


@pytest.mark.parametrize("router", list(ROUTED))
def test_decoding_past_the_window_equals_recompute_with_the_same_window(router):
    cfg = GoHConfig(**CFG, router=router, n_kv_heads=2, sliding_window=5, **ROUTED[router])
    torch.manual_seed(1)
    model = GoHTransformer(cfg).eval()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        full = model(ids).logits
        cache = SlidingWindowKVCache(cfg.n_layers, 5)
        steps = [model(ids[:, :3], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(3, 16)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.stored() == 4  # memory flat: W - 1 positions whatever the length
    generated = model.generate(ids[:, :4], max_new_tokens=20, temperature=0.0)
    recomputed = model.generate(ids[:, :4], max_new_tokens=20, temperature=0.0, use_cache=False)
    assert torch.equal(generated, recomputed)


def test_sliding_window_decoding_with_left_padding_matches_each_row_alone():
    cfg = GoHConfig(**CFG, sliding_window=4, router="graph", n_shared_heads=1, top_k_heads=2)
    torch.manual_seed(2)
    model = GoHTransformer(cfg).eval()
    short, long = torch.randint(0, 64, (1, 3)), torch.randint(0, 64, (1, 6))
    padded = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    together = model.generate(padded, max_new_tokens=10, temperature=0.0, attention_mask=mask)
    assert torch.equal(together[0, 3:], model.generate(short, max_new_tokens=10, temperature=0.0)[0])
    assert torch.equal(together[1], model.generate(long, max_new_tokens=10, temperature=0.0)[0])


# ---------------------------------------------------------------------- static cache
@pytest.mark.parametrize("router", list(ROUTED))
@pytest.mark.parametrize("changes", [dict(n_kv_heads=2), dict(n_kv_heads=1, sliding_window=4),
                                     dict(position_embedding="alibi"),
                                     dict(attention="mla", kv_lora_rank=12, qk_rope_head_dim=4, sliding_window=4)])
def test_static_dynamic_and_recompute_decode_token_for_token(router, changes):
    cfg = GoHConfig(**CFG, router=router, **ROUTED[router], **changes)
    torch.manual_seed(3)
    model = GoHTransformer(cfg).eval()
    prompt = torch.randint(0, 64, (2, 5))
    runs = {kind: model.generate(prompt, max_new_tokens=12, temperature=0.0, cache=kind)
            for kind in ("auto", "static", "dynamic")}
    runs["recompute"] = model.generate(prompt, max_new_tokens=12, temperature=0.0, use_cache=False)
    for kind, ids in runs.items():
        assert torch.equal(ids, runs["dynamic"]), kind


def test_static_cache_writes_in_place_and_refuses_overflow():
    cache = StaticKVCache(1, capacity=4)
    keys, _ = cache.append(0, torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    buffer = cache.keys[0]
    keys, _ = cache.append(0, torch.full((1, 1, 1, 2), 2.0), torch.ones(1, 1, 1, 2))
    assert cache.keys[0] is buffer and keys.data_ptr() == buffer.data_ptr()  # no reallocation
    assert keys[0, 0, :, 0].tolist() == [1.0, 1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="holds 4 positions; 5 were asked for"):
        cache.append(0, torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))


def test_static_slot_writer_writes_at_a_tensor_position_and_returns_every_slot():
    cache = StaticKVCache(2, capacity=4)
    with pytest.raises(ValueError, match="run the prompt first"):
        StaticSlotWriter(cache, torch.tensor([0]))
    for layer in range(2):
        cache.append(layer, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    position = torch.tensor([2])
    writer = StaticSlotWriter(cache, position)
    keys, values = writer.append(1, torch.full((1, 1, 1, 2), 5.0), torch.full((1, 1, 1, 2), 6.0))
    assert keys is cache.keys[1] and keys.shape == (1, 1, 4, 2)  # the whole buffer, in place
    assert keys[0, 0, :, 0].tolist() == [1.0, 1.0, 5.0, 0.0]  # unwritten slots hold zeros
    assert values[0, 0, :, 1].tolist() == [1.0, 1.0, 6.0, 0.0]
    assert cache.keys[0][0, 0, :, 0].tolist() == [1.0, 1.0, 0.0, 0.0]  # other layers untouched
    with pytest.raises(TypeError, match="no Python-side length"):
        writer.length()
    position += 1
    writer.sync()
    assert cache.lengths == [3, 3]


# ---------------------------------------------------------------------- ALiBi
@pytest.mark.parametrize("heads", [4, 6])
def test_alibi_slopes_follow_the_paper(heads):
    expected = {4: [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8],
                6: [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]}[heads]
    torch.testing.assert_close(alibi_slopes(heads), torch.tensor(expected))


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_attention_equals_reference_with_linear_biases(causal):
    cfg = GoHConfig(**CFG, position_embedding="alibi")
    torch.manual_seed(4)
    attn = build_attention(cfg, 0)
    x = torch.randn(2, 7, 32)
    i, j = torch.arange(7)[:, None], torch.arange(7)[None, :]
    bias = -alibi_slopes(4)[:, None, None] * (i - j).abs().float()
    allowed = j <= i if causal else torch.ones(7, 7, dtype=torch.bool)
    reference = masked_attention(x, attn.qkv.weight, attn.out.weight, 4, allowed, bias=bias)
    torch.testing.assert_close(attn(x, causal=causal)[0], reference, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- RoPE scaling
def test_linear_rope_scaling_at_factor_2_equals_positions_halved():
    cfg = GoHConfig(**CFG, rope_scaling="linear", rope_scaling_factor=2.0)
    torch.manual_seed(5)
    attn = build_attention(cfg, 0)
    x = torch.randn(1, 9, 32)
    plain = rope_inverse_frequencies(GoHConfig(**CFG))
    rope = rope_with(plain, torch.arange(9) / 2.0)
    reference = masked_attention(x, attn.qkv.weight, attn.out.weight, 4,
                                 torch.ones(9, 9, dtype=torch.bool).tril(), rope=rope)
    torch.testing.assert_close(attn(x)[0], reference, rtol=1e-5, atol=1e-5)


def test_ntk_and_llama3_frequencies_follow_their_formulas():
    base = dict(CFG, d_model=64, n_heads=2)  # head_dim 32: 16 frequencies
    plain = rope_inverse_frequencies(GoHConfig(**base))
    ntk = rope_inverse_frequencies(GoHConfig(**base, rope_scaling="ntk", rope_scaling_factor=4.0))
    theta = 10000.0 * 4.0 ** (32 / 30)
    torch.testing.assert_close(ntk, 1.0 / theta ** (torch.arange(0, 32, 2).float() / 32))
    assert ntk[0] == plain[0] and ntk[-1] == pytest.approx(plain[-1].item() / 4.0, rel=1e-5)
    llama3 = rope_inverse_frequencies(GoHConfig(**base, rope_scaling="llama3", rope_scaling_factor=8.0,
                                                rope_original_max_seq_len=64, rope_low_freq_factor=1.0,
                                                rope_high_freq_factor=4.0))
    wavelength = 2 * math.pi / plain
    for w, got, want in zip(wavelength.tolist(), llama3.tolist(), plain.tolist()):
        if w < 64 / 4.0:
            assert got == pytest.approx(want)  # high frequencies kept
        elif w > 64 / 1.0:
            assert got == pytest.approx(want / 8.0)  # low frequencies interpolated
        else:
            ramp = (64 / w - 1.0) / (4.0 - 1.0)
            assert got == pytest.approx((1 - ramp) * want / 8.0 + ramp * want)
    assert (wavelength < 16).any() and (wavelength > 64).any() and ((wavelength > 16) & (wavelength < 64)).any()


@pytest.mark.parametrize("field,value,message", [
    ("rope_scaling", "yarn", "rope_scaling='yarn' is not one of"),
    ("rope_scaling_factor", 0.5, "rope_scaling_factor=0.5 must be a finite number >= 1"),
    ("sliding_window", 0, "sliding_window=0 must be >= 1"),
    ("position_embedding", "sinusoid", "position_embedding='sinusoid' is not one of"),
])
def test_bad_position_settings_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        GoHConfig(**CFG, **{field: value})
    with pytest.raises(ValueError, match="rope_scaling='linear' needs position_embedding='rope'"):
        GoHConfig(**CFG, rope_scaling="linear", rope_scaling_factor=2.0, position_embedding="alibi")
