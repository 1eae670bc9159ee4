"""``attention_head_dim``: heads of a width of their own, so ``n_heads * head_dim`` may differ from
``d_model`` (SwitchHead's few heads of a usual width). Unset, nothing changes."""

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.models.block import build_attention

BASE = dict(vocab_size=64, d_model=48, n_layers=2, n_heads=2, max_seq_len=32)
KINDS = {"dense": {}, "switchhead": dict(n_attention_experts=4, top_k_attention_experts=2),
         "goh": dict(router="graph", n_shared_heads=1, top_k_heads=1),
         "moh-sparse": dict(router="linear", n_shared_heads=1, top_k_heads=1, head_execution="sparse"),
         "gqa": dict(n_kv_heads=1)}


def test_unset_is_d_model_over_n_heads_and_the_same_weights():
    cfg = GoHConfig(**BASE)
    assert cfg.head_dim == 24 and GoHConfig(**BASE, attention_head_dim=24).head_dim == 24
    torch.manual_seed(0)
    default = GoHTransformer(cfg)
    torch.manual_seed(0)
    explicit = GoHTransformer(GoHConfig(**BASE, attention_head_dim=24))
    ids = torch.randint(0, 64, (2, 9))
    assert torch.equal(default(ids).logits, explicit(ids).logits)


@pytest.mark.parametrize("kind", list(KINDS))
def test_narrow_heads_are_causal_and_decode_as_they_recompute(kind):
    torch.manual_seed(0)
    model = GoHTransformer(GoHConfig(**BASE, attention_head_dim=16, **KINDS[kind])).eval()
    ids = torch.randint(0, 64, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = 3
    torch.testing.assert_close(model(changed).logits[:, :8], model(ids).logits[:, :8], rtol=0, atol=1e-5)
    assert torch.equal(model.generate(ids[:, :4], 6, temperature=0.0),
                       model.generate(ids[:, :4], 6, temperature=0.0, use_cache=False))


def test_the_projections_have_the_heads_width():
    cfg = GoHConfig(**BASE, attention_head_dim=16)
    attention = build_attention(cfg, 0)
    # queries, keys and values of 2 heads of 16, then the 32 head outputs back to d_model 48
    assert attention.qkv.weight.shape == (3 * 2 * 16, 48) and attention.out.weight.shape == (48, 32)


def test_bad_widths_are_refused_in_one_line():
    with pytest.raises(ValueError, match="attention_head_dim=0 must be >= 1"):
        GoHConfig(**BASE, attention_head_dim=0)
    with pytest.raises(ValueError, match="attention='mla'"):
        GoHConfig(**BASE, attention_head_dim=16, attention="mla", kv_lora_rank=8)
    GoHConfig(**{**BASE, "d_model": 50}, attention_head_dim=16)  # no divisibility needed with a width of its own
    with pytest.raises(ValueError, match="or set attention_head_dim"):
        GoHConfig(**{**BASE, "d_model": 51, "n_heads": 2})
