"""MLA: absorbed == expanded, cached == recompute, a latent cache of r + d_R numbers, routed heads."""

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.layers.kv_cache import DynamicKVCache, StaticKVCache
from gohgraph.models.block import build_attention
from tests.references import moh_llama3_head_mask

MLA = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, attention="mla", kv_lora_rank=12,
           qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=5)
ROUTED = {"dense": {}, "linear": dict(n_shared_heads=1, top_k_heads=2),
          "graph": dict(n_shared_heads=1, top_k_heads=2), "query-norm": dict(n_shared_heads=1, top_k_heads=2)}


@pytest.mark.parametrize("q_lora_rank", [None, 10])
def test_absorbed_decode_equals_the_expanded_path(q_lora_rank):
    cfg = GoHConfig(**MLA, q_lora_rank=q_lora_rank, router="graph", n_shared_heads=1, top_k_heads=2)
    torch.manual_seed(0)
    attn = build_attention(cfg, 0).eval()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    attn = attn.double()
    outputs = {}
    for absorb in (False, True):
        attn.absorb = absorb
        cache = DynamicKVCache(1)
        steps = [attn(x[:, :4], cache=cache)[0]] + [attn(x[:, t:t + 1], cache=cache)[0] for t in range(4, 9)]
        outputs[absorb] = torch.cat(steps, 1)
        full = attn(x)[0]  # no cache: the whole sequence at once, both paths too
        torch.testing.assert_close(outputs[absorb], full, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-5, atol=1e-5)
    assert outputs[True].abs().max() > 1e-3


@pytest.mark.parametrize("router", list(ROUTED))
def test_mla_decoding_static_dynamic_and_recompute_agree(router):
    cfg = GoHConfig(**MLA, router=router, **ROUTED[router])
    torch.manual_seed(1)
    model = GoHTransformer(cfg).eval()
    prompt = torch.randint(0, 64, (2, 5))
    runs = {kind: model.generate(prompt, max_new_tokens=10, temperature=0.0, cache=kind) for kind in ("static", "dynamic")}
    runs["recompute"] = model.generate(prompt, max_new_tokens=10, temperature=0.0, use_cache=False)
    assert torch.equal(runs["static"], runs["recompute"]) and torch.equal(runs["dynamic"], runs["recompute"])


def test_the_cache_holds_only_the_latent_and_the_rope_key():
    cfg = GoHConfig(**MLA)
    model = GoHTransformer(cfg).eval()
    cache = StaticKVCache(cfg.n_layers, 16)
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 7)), cache=cache)
    latent, rope_key = cache.keys[0], cache.values[0]
    assert latent.shape == (1, 1, 16, 12) and rope_key.shape == (1, 1, 16, 4)
    per_token = latent.shape[-1] + rope_key.shape[-1]
    assert per_token == cfg.kv_lora_rank + cfg.qk_rope_head_dim == 16  # MHA would hold 2 * 4 * 8 = 64


def test_routed_heads_gate_mla_head_outputs():
    """query-norm routing on MLA: the gates follow MoH-LLaMA3's rule on MLA's queries, and the output
    is dense MLA's per-head outputs with the unselected heads zeroed."""
    routed = GoHConfig(**MLA, router="query-norm", n_shared_heads=1, top_k_heads=1)
    dense = GoHConfig(**MLA)
    torch.manual_seed(2)
    attn = build_attention(routed, 0)
    plain = build_attention(dense, 0)
    plain.load_state_dict(attn.state_dict(), strict=False)  # the routing buffers have no place in dense MLA
    captured = {}
    plain.out.register_forward_pre_hook(lambda module, args: captured.update(heads=args[0]))
    x = torch.randn(2, 7, 32)
    y, record = attn(x)
    plain(x)
    q = attn.q_proj(x).view(2, 7, 4, 10)
    mask = moh_llama3_head_mask(q, 1, 1)
    torch.testing.assert_close(record.head_gates, mask)
    heads_out = captured["heads"].view(2, 7, 4, 5) * mask.unsqueeze(-1)
    torch.testing.assert_close(y, heads_out.reshape(2, 7, 20) @ attn.out.weight.t(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("changes,message", [
    (dict(n_kv_heads=2), "n_kv_heads=2 does not apply to attention='mla'"),
    (dict(qk_rope_head_dim=3), "even qk_rope_head_dim"),
    (dict(position_embedding="learned"), "attention='mla' needs position_embedding='rope'"),
    (dict(kv_lora_rank=0), "kv_lora_rank=0 must be a positive integer"),
    (dict(attention="gqa"), "attention='gqa' is not one of"),
    (dict(linear="bitnet"), "attention='mla' needs linear='standard', got linear='bitnet'"),
])
def test_bad_mla_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        GoHConfig(**{**MLA, **changes})
