"""Head-sparse execution (docs/skipping-work.md) equals the masked reference: the kernel against SDPA over
every head times the active mask, and whole models (every head router, GQA/MQA, MLA, windows,
ALiBi, T5 bias, padding, encoder, cross-attention) in outputs, gradients and generated tokens."""

import pytest
import torch
import torch.nn.functional as F

import gohgraph.layers.attention as attention_module
import gohgraph.layers.head_sparse as head_sparse
import gohgraph.layers.latent_attention as latent_attention_module
from gohgraph import GoHConfig, GoHEncoder, GoHSeq2Seq, GoHTransformer
from gohgraph.layers.attention import attention_mask
from gohgraph.layers.head_sparse import head_sparse_attention, picks_head_sparse


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 8 queries, so tiny sequences cross several chunk boundaries; counts the kernel's
    calls from the attention modules, so a test knows the sparse path ran."""
    monkeypatch.setattr(head_sparse, "QUERY_CHUNK", 8)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return head_sparse_attention(*args, **kwargs)
    monkeypatch.setattr(attention_module, "head_sparse_attention", counted)
    monkeypatch.setattr(latent_attention_module, "head_sparse_attention", counted)
    return calls


def masked_reference(q, k, v, active, attn_mask, is_causal):
    """Every head attends (plain SDPA, GQA by repeating kv heads), then inactive pairs are zeroed."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    return out * active.transpose(1, 2).unsqueeze(-1).to(out.dtype)


def random_active(batch, seq, heads, shared, generator):
    active = torch.rand(batch, seq, heads, generator=generator) < 0.45
    active[..., :shared] = True
    return active


CASES = {
    "plain causal (fused CPU merge)": dict(),
    "GQA": dict(kv_heads=3),
    "MQA": dict(kv_heads=1),
    "padding mask": dict(padding=True),
    "sliding window": dict(window=5),
    "ALiBi-like bias": dict(bias=True),
    "cached prefill": dict(cached=7),
    "bidirectional": dict(causal=False),
    "cross (other key length)": dict(causal=False, keys=13),
    "decode step": dict(seq=1, cached=20),
    "a few queries": dict(seq=3, cached=20),
    "decode step, GQA": dict(seq=1, cached=20, kv_heads=2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shared", [0, 2])
def test_kernel_equals_masked_reference_in_outputs_and_gradients(case, shared, small_chunks):
    spec = dict(seq=29, kv_heads=6, causal=True, cached=0, keys=None, padding=False, window=None, bias=False)
    spec.update(CASES[case])
    generator = torch.Generator().manual_seed(0)
    batch, heads, dim, seq = 2, 6, 8, spec["seq"]
    total = spec["keys"] or seq + spec["cached"]
    q = torch.randn(batch, heads, seq, dim, generator=generator, dtype=torch.float64).requires_grad_()
    k = torch.randn(batch, spec["kv_heads"], total, dim, generator=generator, dtype=torch.float64).requires_grad_()
    v = torch.randn(batch, spec["kv_heads"], total, dim, generator=generator, dtype=torch.float64).requires_grad_()
    active = random_active(batch, seq, heads, shared, generator)
    mask = None
    if spec["padding"]:
        mask = torch.ones(batch, 1, 1, total, dtype=torch.bool)
        mask[0, ..., :4] = False
    bias = torch.randn(heads, seq, total, generator=generator, dtype=torch.float64) if spec["bias"] else None
    self_attention = spec["keys"] is None
    attn_mask, is_causal = attention_mask(q, total, spec["causal"], mask, self_attention, spec["window"], bias=bias)
    upstream = torch.randn(batch, heads, seq, dim, generator=generator, dtype=torch.float64)

    def run(fn):
        out = fn()
        (out * upstream).sum().backward()
        grads = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        return out.detach(), grads

    expected, expected_grads = run(lambda: masked_reference(q, k, v, active, attn_mask, is_causal))
    got, got_grads = run(lambda: head_sparse_attention(q, k, v, active, shared, attn_mask, is_causal,
                                                       causal_keys=spec["causal"] and self_attention, scale=None))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)
    assert expected.abs().max() > 0.1


def test_the_fused_merge_runs_in_float32_too(small_chunks):
    """The CPU flash kernel's float32 path (what training uses) against the reference, to 1e-5."""
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 5, 40, 16, generator=generator).requires_grad_() for _ in range(3))
    active = random_active(2, 40, 5, 1, generator)
    expected = masked_reference(q, k, v, active, None, True)
    got = head_sparse_attention(q, k, v, active, 1, None, True, causal_keys=True, scale=None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_unevenly_loaded_heads_split_into_groups_and_stay_exact(small_chunks):
    """Routed heads always on, never on, on for one query, and random (a fresh graph router's
    uneven loads): the prefix calls run groups of consecutive heads (:func:`_head_slices`), and the
    result is the masked reference's in float64, outputs and gradients."""
    assert head_sparse._head_slices([8, 0, 1, 7, 6, 0]) == [(slice(0, 1), 8), (slice(2, 3), 1), (slice(3, 5), 7)]
    assert head_sparse._head_slices([5, 6, 5, 6]) == [(slice(0, 4), 6)]  # even loads: one call
    assert head_sparse._head_slices([0, 0]) == []
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 6, 35, 8, generator=generator, dtype=torch.float64).requires_grad_() for _ in range(3))
    active = random_active(1, 35, 6, 1, generator)
    active[..., 1], active[..., 2], active[..., 3] = True, False, False
    active[0, 20, 3] = True
    expected = masked_reference(q, k, v, active, None, True)
    got = head_sparse_attention(q, k, v, active, 1, None, True, causal_keys=True, scale=None)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    for g, e in zip(torch.autograd.grad(got.square().sum(), (q, k, v)),
                    torch.autograd.grad(expected.square().sum(), (q, k, v))):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kv_heads", [6, 2, 1])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_gathered_heads_equal_the_masked_reference(kv_heads, mask_kind):
    """The compiled decode step's kernel (run eagerly here; the compiled step is tested in
    tests/models/test_compile.py): every row keeps at most 3 of 6 heads, one row fewer than 3."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, dim, keys = 3, 6, 8, 17
    q = torch.randn(batch, heads, 1, dim, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, keys, dim, generator=generator, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, keys, dim, generator=generator, dtype=torch.float64)
    active = torch.zeros(batch, 1, heads, dtype=torch.bool)
    active[0, 0, [0, 2, 5]] = True
    active[1, 0, [1, 3, 4]] = True
    active[2, 0, [4]] = True  # fewer than the most: the kernel fills up with an inactive head, dropped
    attn_mask = None
    if mask_kind == "bool":  # the compiled step's key mask: unwritten slots and left padding
        attn_mask = torch.ones(batch, 1, 1, keys, dtype=torch.bool)
        attn_mask[0, ..., :4] = False
        attn_mask[:, ..., -2:] = False
    elif mask_kind == "additive":
        attn_mask = torch.randn(batch, 1, 1, keys, generator=generator, dtype=torch.float64)
    expected = masked_reference(q, k, v, active, attn_mask, False)
    got = head_sparse.gathered_head_attention(q, k, v, active, 3, attn_mask, scale=None)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert expected.abs().max() > 0.1


def test_the_gathered_rule_runs_only_inside_compile_with_a_fixed_count():
    assert not head_sparse.picks_gathered_heads("sparse", 8, 12, 1, 8192)  # eager: the head-runs kernel
    compiling = torch.compile(lambda mode, most, keys: torch.tensor(head_sparse.picks_gathered_heads(mode, most, 12, 1, keys)),
                              backend="eager", fullgraph=True)
    assert bool(compiling("sparse", 8, 16)) and not bool(compiling("masked", 8, 8192))
    assert not bool(compiling("sparse", None, 8192))  # a dense blend or forced heads: no fixed count
    assert bool(compiling("auto", 8, 3 * head_sparse.MIN_GATHERED_DECODE_KEYS))
    assert not bool(compiling("auto", 8, 3 * head_sparse.MIN_GATHERED_DECODE_KEYS - 3))


def test_the_rule_picks_sparse_only_when_something_can_be_skipped():
    gates = torch.tensor([[[1.0, 0.0, 2.0]]])
    assert picks_head_sparse("sparse", gates, q_len=4, k_len=4)
    assert not picks_head_sparse("masked", gates, q_len=4096, k_len=4096)
    assert not picks_head_sparse("auto", gates, q_len=16, k_len=16)  # tiny shapes stay masked
    assert not picks_head_sparse("auto", gates, q_len=8192, k_len=8192)  # training: measured no faster on CPU
    # decoding: sparse once the skipped cache rows (keys x share of pairs off, here 1/3) pay
    assert picks_head_sparse("auto", gates, q_len=1, k_len=3 * head_sparse.MIN_SKIPPED_DECODE_KEYS)
    assert not picks_head_sparse("auto", gates, q_len=1, k_len=3 * head_sparse.MIN_SKIPPED_DECODE_KEYS - 3)
    assert not picks_head_sparse("sparse", torch.ones(1, 1, 3), q_len=4, k_len=4)  # dense blend: nothing off
    assert not picks_head_sparse("sparse", gates, q_len=4, k_len=4, dropout=0.1)
    assert not picks_head_sparse("sparse", gates, q_len=4, k_len=4, mixes_heads=True)  # talking heads
    # tensor parallelism runs sparse on each rank's heads: tests/parallel/test_tensor_parallel.py


# ------------------------------------------------------------------------------------ whole models
ROUTED = dict(n_shared_heads=2, top_k_heads=2)
DECODER = dict(vocab_size=64, d_model=48, n_layers=2, n_heads=6, max_seq_len=64)
DECODER_CASES = {
    "MoH": dict(router="linear"),
    "MoH, mha gating": dict(router="linear", head_gate_normalisation="mha"),
    "GoH with flow": dict(router="graph"),
    "GoH without flow": dict(router="graph", inter_head_flow=False),
    "GoH ring graph": dict(router="graph", head_graph="ring"),
    "query-norm": dict(router="query-norm", n_shared_heads=3, top_k_heads=1),
    "GQA": dict(router="graph", n_kv_heads=3),
    "MQA": dict(router="linear", n_kv_heads=1),
    "MLA": dict(router="graph", attention="mla", kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8,
                v_head_dim=8),
    "sliding window": dict(router="graph", sliding_window=6),
    "ALiBi": dict(router="linear", position_embedding="alibi"),
    "expert FFN": dict(router="graph", ffn="moe", n_experts=4, top_k_experts=2),
}


def with_flow_weights(model):
    for module in model.modules():  # a non-zero flow scale, so the flow's gradients are exercised
        if getattr(module, "flow_scale", None) is not None:
            with torch.no_grad():
                module.flow_scale.normal_()
    return model


def outputs_and_gradients(model, mode, forward, calls):
    model.set_execution(head_execution=mode)
    model.zero_grad(set_to_none=True)
    before = len(calls)
    loss, logits = forward(model)
    loss.backward()
    assert (len(calls) > before) == (mode == "sparse")  # the head-sparse kernel ran exactly when asked
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_sparse_equals_masked(model, forward, calls, real=None):
    """``forward(model) -> (loss, outputs)`` in both modes: outputs (at ``real`` positions) and the
    gradient of every parameter agree to 1e-5."""
    (logits_m, grads_m) = outputs_and_gradients(model, "masked", forward, calls)
    (logits_s, grads_s) = outputs_and_gradients(model, "sparse", forward, calls)
    if real is not None:
        logits_m, logits_s = logits_m[real], logits_s[real]
    torch.testing.assert_close(logits_s, logits_m, rtol=1e-5, atol=1e-5)
    assert grads_s.keys() == grads_m.keys()
    for name in grads_m:
        torch.testing.assert_close(grads_s[name], grads_m[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_decoder_sparse_equals_masked(case, small_chunks):
    torch.manual_seed(0)
    model = with_flow_weights(GoHTransformer(GoHConfig(**DECODER, **{**ROUTED, **DECODER_CASES[case]})))
    ids = torch.randint(0, 64, (2, 27))

    def forward(m):
        out = m(ids, labels=ids)
        return out.loss, out.logits
    assert_sparse_equals_masked(model, forward, small_chunks)


def test_decoder_sparse_equals_masked_with_left_padding(small_chunks):
    torch.manual_seed(1)
    model = with_flow_weights(GoHTransformer(GoHConfig(**DECODER, router="graph", **ROUTED)))
    ids = torch.randint(0, 64, (3, 25))
    mask = torch.ones(3, 25, dtype=torch.long)
    mask[0, :6], mask[2, :11] = 0, 0

    def forward(m):
        out = m(ids, attention_mask=mask)
        return (out.logits.log_softmax(-1)[..., 0] * mask).sum() + out.aux_loss, out.logits
    assert_sparse_equals_masked(model, forward, small_chunks, real=mask.bool())


@pytest.mark.parametrize("router", ["linear", "graph"])
def test_encoder_sparse_equals_masked(router, small_chunks):
    torch.manual_seed(2)
    cfg = GoHConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, router=router, n_shared_heads=1,
                    top_k_heads=2, max_seq_len=32, model_type="encoder", position_embedding="sinusoidal")
    model = with_flow_weights(GoHEncoder(cfg))
    ids = torch.randint(0, 64, (3, 21))
    mask = torch.ones(3, 21, dtype=torch.long)
    mask[1, 15:] = 0

    def forward(m):
        hidden = m(ids, mask).hidden
        return (hidden * mask[..., None]).square().sum(), hidden
    assert_sparse_equals_masked(model, forward, small_chunks, real=mask.bool())


@pytest.mark.parametrize("position_embedding", ["t5-relative", "sinusoidal"])
def test_seq2seq_self_and_cross_attention_sparse_equals_masked(position_embedding, small_chunks):
    torch.manual_seed(3)
    cfg = GoHConfig(vocab_size=64, d_model=32, n_layers=2, n_decoder_layers=2, n_heads=4, router="graph",
                    n_shared_heads=1, top_k_heads=2, router_dim=8, max_seq_len=32, model_type="seq2seq",
                    position_embedding=position_embedding, attention_scale="none")
    model = with_flow_weights(GoHSeq2Seq(cfg))
    source, target = torch.randint(0, 64, (2, 19)), torch.randint(0, 64, (2, 17))
    source_mask = torch.ones(2, 19, dtype=torch.long)
    source_mask[0, 12:] = 0

    def forward(m):
        out = m(source, attention_mask=source_mask, labels=target)
        return out.loss, out.logits
    assert_sparse_equals_masked(model, forward, small_chunks)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("case", ["GoH with flow", "MoH", "GQA", "MLA", "sliding window"])
def test_generation_sparse_equals_masked_token_for_token(case, cache, small_chunks):
    torch.manual_seed(4)
    model = with_flow_weights(GoHTransformer(GoHConfig(**DECODER, **{**ROUTED, **DECODER_CASES[case]}))).eval()
    prompt = torch.randint(0, 64, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    runs = {}
    for mode in ("masked", "sparse"):
        model.set_execution(head_execution=mode)
        runs[mode] = model.generate(prompt, max_new_tokens=12, temperature=0.0, attention_mask=mask, cache=cache)
    assert torch.equal(runs["sparse"], runs["masked"])
    assert small_chunks  # the sparse runs went through the kernel


def test_compiled_generation_with_sparse_execution_keeps_the_tokens():
    """Inside torch.compile the rule runs masked (the kernels branch on the routing), so the
    whole-step compiled decode gives the eager tokens in either mode."""
    torch.manual_seed(5)
    model = with_flow_weights(GoHTransformer(GoHConfig(**DECODER, router="graph", **ROUTED))).eval()
    prompt = torch.randint(0, 64, (2, 6))
    model.set_execution(head_execution="sparse")
    eager = model.generate(prompt, max_new_tokens=6, temperature=0.0)
    compiled = model.generate(prompt, max_new_tokens=6, temperature=0.0, compile=True)
    assert torch.equal(eager, compiled)


def test_execution_mode_is_no_weight(tmp_path):
    torch.manual_seed(6)
    model = GoHTransformer(GoHConfig(**DECODER, router="linear", **ROUTED, head_execution="sparse"))
    model.save_pretrained(tmp_path / "run")
    loaded = GoHTransformer.from_pretrained(tmp_path / "run")
    assert loaded.config.head_execution == "sparse"
    masked = GoHTransformer(GoHConfig(**DECODER, router="linear", **ROUTED, head_execution="masked"))
    assert masked.state_dict().keys() == loaded.state_dict().keys()
    with pytest.raises(ValueError, match="head_execution"):
        loaded.set_execution(head_execution="fast")


def test_bfloat16_autocast_trains_sparse_like_masked(small_chunks):
    """Under CPU bf16 autocast the two modes agree to bf16 rounding (the kernels' order differs)."""
    torch.manual_seed(7)
    model = with_flow_weights(GoHTransformer(GoHConfig(**DECODER, router="graph", **ROUTED)))
    ids = torch.randint(0, 64, (2, 30))

    def forward(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(ids, labels=ids)
        return out.loss, out.logits.float()
    (logits_m, grads_m) = outputs_and_gradients(model, "masked", forward, small_chunks)
    (logits_s, grads_s) = outputs_and_gradients(model, "sparse", forward, small_chunks)
    torch.testing.assert_close(logits_s, logits_m, rtol=0, atol=2e-2)
    for name, grad in grads_m.items():
        torch.testing.assert_close(grads_s[name], grad, rtol=0.1, atol=2e-3 * max(1.0, float(grad.abs().max())),
                                   msg=name)
