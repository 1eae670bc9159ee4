"""Talking-heads attention (Shazeer et al. 2020) as a configuration of GoHAttention: identity mixing
is dense attention, random mixing equals an einsum of the paper's equations (outputs and
gradients), causality, cached decoding, the head routers on top, and the combinations refused."""

import pytest
import torch

import gohgraph.layers.attention as attention_module
import gohgraph.layers.head_sparse as head_sparse
from gohgraph import GoHConfig, GoHTransformer
from gohgraph.layers.attention import GoHAttention, attention_mask, talking_heads_attention
from gohgraph.layers.head_sparse import picks_head_sparse
from gohgraph.models.block import build_attention
from gohgraph.training.optim import parameter_groups
from tests.helpers import assert_later_tokens_change_no_earlier_logit

TINY = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, router_dim=8, router_rounds=1)
ROUTED = dict(n_shared_heads=1, top_k_heads=2)
ROUTERS = {"dense": dict(), "linear": dict(router="linear", **ROUTED),
           "graph": dict(router="graph", inter_head_flow=True, **ROUTED)}


def randomise_mixing(model: torch.nn.Module, seed: int = 0) -> None:
    """Mixing matrices away from the identity (identity + noise), so a test sees the mixing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "talking_" in name:
                param.add_(0.5 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def reference_talking_heads(q, k, v, logit_mixing, weight_mixing, allowed=None, bias=None):
    """The paper's equations written out: ``q [b, h, q, d]``, ``k, v [b, kv, k, d]``, ``allowed``
    bool and ``bias`` float, both ``[b|1, h|1, q, k]``, added to the mixed logits."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) / q.shape[-1] ** 0.5
    mixed = torch.einsum("hj,bjqk->bhqk", logit_mixing, logits)
    if bias is not None:
        mixed = mixed + bias
    if allowed is not None:
        mixed = mixed.masked_fill(~allowed, float("-inf"))
    weights = torch.einsum("hj,bjqk->bhqk", weight_mixing, mixed.softmax(-1))
    return torch.einsum("bhqk,bhkd->bhqd", weights, v)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_kernel_equals_the_papers_equations_with_mask_and_bias(kv_heads):
    generator = torch.Generator().manual_seed(1)
    batch, heads, q_len, k_len, dim = 2, 4, 5, 9, 8

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)
    q, k, v = rand(batch, heads, q_len, dim), rand(batch, kv_heads, k_len, dim), rand(batch, kv_heads, k_len, dim)
    logit_mixing, weight_mixing = rand(heads, heads), rand(heads, heads)
    padding = torch.ones(batch, k_len, dtype=torch.bool)
    padding[0, :2] = False
    causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    allowed = padding[:, None, None, :] & causal
    bias = rand(1, heads, q_len, k_len)  # ALiBi / T5-like per-head score bias
    additive = bias.masked_fill(~allowed, float("-inf"))
    for mask, kwargs in ((allowed, dict(allowed=allowed)), (additive, dict(allowed=allowed, bias=bias))):
        got = talking_heads_attention(q, k, v, logit_mixing, weight_mixing, mask)
        want = reference_talking_heads(q, k, v, logit_mixing, weight_mixing, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_kernel_is_causal_flag_equals_an_explicit_causal_mask():
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 3, 6, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    mixing = torch.randn(2, 3, 3, generator=generator, dtype=torch.float64)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(talking_heads_attention(q, k, v, *mixing, is_causal=True),
                               reference_talking_heads(q, k, v, *mixing, allowed=causal))


def layer(**overrides) -> GoHAttention:
    cfg = GoHConfig(**{**TINY, "position_embedding": "learned", "talking_heads": True, **overrides})
    torch.manual_seed(0)
    return build_attention(cfg, 0).double()


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_layer_equals_einsum_reference_outputs_and_gradients(kv_heads):
    attention = layer(n_kv_heads=kv_heads, linear_bias=True)
    randomise_mixing(attention)
    heads, kv, dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
    x = torch.randn(2, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    y, _ = attention(x)
    y.square().sum().backward()
    got = [x.grad, attention.talking_logit_mixing.grad, attention.talking_weight_mixing.grad, attention.qkv.weight.grad]

    params = [x, attention.talking_logit_mixing, attention.talking_weight_mixing, attention.qkv.weight]
    for p in params:
        p.grad = None
    q, k, v = torch.nn.functional.linear(x, attention.qkv.weight, attention.qkv.bias).split(
        [heads * dim, kv * dim, kv * dim], dim=-1)
    q = q.view(2, 7, heads, dim).transpose(1, 2)
    k, v = (t.view(2, 7, kv, dim).transpose(1, 2) for t in (k, v))
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    o = reference_talking_heads(q, k, v, attention.talking_logit_mixing, attention.talking_weight_mixing, causal)
    want_y = attention.out(o.transpose(1, 2).reshape(2, 7, heads * dim))
    want_y.square().sum().backward()
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-10)
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-10)


def model_pair(**overrides):
    """A model with talking heads and the same model without (same weights otherwise)."""
    cfg = GoHConfig(**{**TINY, **overrides})
    torch.manual_seed(0)
    plain = GoHTransformer(cfg).eval()
    talking = GoHTransformer(cfg.replace(talking_heads=True)).eval()
    missing, unexpected = talking.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("talking_" in name for name in missing)
    return plain, talking


@pytest.mark.parametrize("overrides", [dict(), dict(n_kv_heads=2), dict(position_embedding="alibi"),
                                       ROUTERS["linear"], ROUTERS["graph"]],
                         ids=["MHA", "GQA", "ALiBi", "MoH", "GoH"])
def test_identity_mixing_is_dense_attention(overrides):
    plain, talking = model_pair(**overrides)
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(talking(ids).logits, plain(ids).logits, rtol=0, atol=1e-6)


def test_checkpoints_without_talking_heads_have_no_mixing_parameters():
    names = [name for name, _ in GoHTransformer(GoHConfig(**TINY)).named_parameters()]
    assert not any("talking" in name for name in names)
    talking = GoHTransformer(GoHConfig(**TINY, talking_heads=True))
    mixing = [name for name, _ in talking.named_parameters() if "talking_" in name]
    assert len(mixing) == 2 * TINY["n_layers"]
    decayed = parameter_groups(talking, 0.1)[0]["param_names"]
    assert not set(mixing) & set(decayed)  # identity start: decay would flatten attention


def talking_model(router: str, **overrides) -> GoHTransformer:
    torch.manual_seed(0)
    model = GoHTransformer(GoHConfig(**{**TINY, **ROUTERS[router], "talking_heads": True, **overrides})).eval()
    randomise_mixing(model)
    return model


@pytest.mark.parametrize("router", list(ROUTERS))
def test_changing_later_tokens_never_changes_earlier_outputs(router):
    assert_later_tokens_change_no_earlier_logit(talking_model(router, n_kv_heads=2), vocab_size=32)


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("overrides", [dict(), dict(n_kv_heads=2), dict(sliding_window=6)],
                         ids=["MHA", "GQA", "window"])
def test_cached_decoding_equals_recompute(router, overrides):
    model = talking_model(router, **overrides)
    prompt = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(6))
    cached = model.generate(prompt, max_new_tokens=8, temperature=0.0, use_cache=True)
    recomputed = model.generate(prompt, max_new_tokens=8, temperature=0.0, use_cache=False)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("router", ["linear", "graph"])
def test_routed_talking_heads_apply_gates_after_mixing(router):
    """The routing's gates (and GoH's flow) act on the talking-heads outputs as on SDPA's."""
    torch.manual_seed(0)
    cfg = GoHConfig(**{**TINY, **ROUTERS[router], "talking_heads": True, "position_embedding": "learned"})
    attention = build_attention(cfg, 0).double().eval()
    randomise_mixing(attention)
    x = torch.randn(2, 6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y, routing = attention(x)
        q, k, v = attention.qkv(x).split([32, 32, 32], dim=-1)
        gates, mixing, _ = attention.head_routing(x, q.view(2, 6, 4, 8))
        q, k, v = (t.view(2, 6, 4, 8).transpose(1, 2) for t in (q, k, v))
        causal = torch.ones(6, 6, dtype=torch.bool).tril()
        o = reference_talking_heads(q, k, v, attention.talking_logit_mixing, attention.talking_weight_mixing, causal)
        o = attention.head_routing.mix(o.transpose(1, 2), gates, mixing)
        want = attention.out(o.reshape(2, 6, 32))
    assert (gates == 0).any()  # some heads are off, and their gate still zeroes them after mixing
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)


def test_talking_heads_never_run_head_sparse(monkeypatch):
    monkeypatch.setattr(head_sparse, "MIN_SKIPPED_DECODE_KEYS", 0)  # "auto" would skip every decode step
    calls = []
    original = attention_module.head_sparse_attention
    monkeypatch.setattr(attention_module, "head_sparse_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    prompt = torch.randint(0, 32, (1, 4), generator=torch.Generator().manual_seed(8))
    talking_model("linear").generate(prompt, max_new_tokens=3, temperature=0.0)
    assert not calls
    talking_model("linear", talking_heads=False).generate(prompt, max_new_tokens=3, temperature=0.0)
    assert calls  # the same model without talking heads does skip heads: the spy sees that path
    gates = torch.tensor([[[1.0, 0.0, 1.0]]])
    assert picks_head_sparse("sparse", gates, 1, 64) and not picks_head_sparse("sparse", gates, 1, 64, mixes_heads=True)


@pytest.mark.parametrize("overrides, field", [
    (dict(attention="mla"), "attention"),
    (dict(router="linear", head_execution="sparse", **ROUTED), "head_execution"),
    (dict(talking_heads="maybe"), "talking_heads"),
])
def test_combinations_it_cannot_do_are_refused(overrides, field):
    with pytest.raises(ValueError, match=field):
        GoHConfig(**{**TINY, "talking_heads": True, **overrides})


def test_masks_reach_the_mixed_logits():
    """The bias attention_mask builds (ALiBi here) is added after the logit mixing: a key masked for
    one head is masked in every head, whatever the mixing."""
    attention = layer(position_embedding="alibi")
    q = torch.randn(1, 4, 5, 8, dtype=torch.float64)
    mask, is_causal = attention_mask(q, 5, True, None, True, None, attention.score_bias, None)
    assert mask is not None and not is_causal
    out = talking_heads_attention(q, q, torch.eye(5, 8, dtype=torch.float64).expand(1, 4, 5, 8),
                                  torch.ones(4, 4, dtype=torch.float64), torch.eye(4, dtype=torch.float64), mask)
    assert torch.all(out[0, :, 0, 1:] == 0)  # the first query's weights: only on the first key


def test_tensor_parallel_refuses_talking_heads():
    from gohgraph.parallel.tensor_parallel import check_tensor_parallel_layout

    with pytest.raises(ValueError, match=r"^tensor_parallel=2 does not shard talking_heads=True \(layer 0\)"):
        check_tensor_parallel_layout(GoHTransformer(GoHConfig(**TINY, talking_heads=True)), 2)


def test_talking_heads_row_of_the_comparison():
    from gohgraph.experiments.variants import (
        SETTINGS,
        TALKING_HEADS,
        comparison_variants,
        match_parameters,
        reference_of,
    )

    variants = comparison_variants(**SETTINGS["quick"][0], names=["dense", TALKING_HEADS])
    row = variants[TALKING_HEADS]
    assert row.talking_heads and row.router == "dense" and row.ffn == "dense"
    assert "Shazeer et al. 2020" in reference_of(row) and "Shazeer" not in reference_of(variants["dense"])
    matched = match_parameters(variants)
    assert abs(matched[TALKING_HEADS].mismatch) <= 0.02
    assert matched[TALKING_HEADS].config.ffn_hidden is not None  # resized to pay for its 2 H^2 per layer


@pytest.mark.parametrize("model_type", ["encoder", "seq2seq"])
def test_identity_mixing_is_dense_attention_in_encoders_and_cross_attention(model_type):
    from gohgraph import GoHEncoder, GoHSeq2Seq

    family = {"encoder": (GoHEncoder, dict()), "seq2seq": (GoHSeq2Seq, dict(position_embedding="t5-relative"))}
    model_class, extra = family[model_type]
    cfg = GoHConfig(**{**TINY, "model_type": model_type, **extra})
    torch.manual_seed(0)
    plain = model_class(cfg).eval()
    talking = model_class(cfg.replace(talking_heads=True)).eval()
    talking.load_state_dict(plain.state_dict(), strict=False)
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(9))
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[0, 6:] = 0
    kwargs = dict(attention_mask=padding) if model_type == "encoder" else dict(attention_mask=padding, labels=ids)
    with torch.no_grad():
        torch.testing.assert_close(talking(ids, **kwargs).logits, plain(ids, **kwargs).logits, rtol=0, atol=1e-6)
