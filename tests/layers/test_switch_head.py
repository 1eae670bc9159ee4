"""SwitchHead (Csordás et al. 2024) as a configuration of GoHAttention: the sparse expert dispatch
equals a port of the released SwitchHeadCore's computation (every expert computed, then masked by
the sigmoid top-k) in outputs, selections and gradients; causality; cached decoding; the routing
record; and the combinations refused."""

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.layers.attention import GoHAttention
from gohgraph.models.block import build_attention
from gohgraph.ops.grouped_matmul import routed_matmul
from tests.helpers import assert_later_tokens_change_no_earlier_logit

TINY = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, router_dim=8, router_rounds=1)
SWITCH = dict(n_attention_experts=4, top_k_attention_experts=2)


def layer(dtype=torch.float32, **overrides) -> GoHAttention:
    torch.manual_seed(0)
    cfg = GoHConfig(**{**TINY, "position_embedding": "learned", **SWITCH, **overrides})
    return build_attention(cfg, 0).to(dtype)


def sigmoid_top_k(tokens, selection, heads, k):
    """The released get_sel: float32 sigmoid scores per head, top-k, the chosen scores as gates
    (no renormalisation); returned dense, 0 off the top-k: ``[batch, len, heads, E]``."""
    scores = torch.sigmoid(torch.nn.functional.linear(tokens, selection).float())
    scores = scores.view(*tokens.shape[:-1], heads, -1)
    chosen = scores.topk(k, dim=-1).indices
    dense = torch.zeros_like(scores).scatter(-1, chosen, scores.gather(-1, chosen))
    return dense.to(tokens.dtype), chosen


def reference_switch_head(x, attention: GoHAttention):
    """SwitchHeadCore's forward (RobertCsordas/switchhead, non-Triton semantics) written out for
    self-attention without positions: q, k single projections scaled by d^-1/4 each; value experts
    chosen by the source token, output experts by the destination token; causal SDPA."""
    switch = attention.switch_head
    batch, seq, _ = x.shape
    heads, kv_heads, dim, k = attention.n_heads, attention.n_kv_heads, attention.head_dim, switch.top_k
    q, key = torch.nn.functional.linear(x, attention.qkv.weight).split([heads * dim, kv_heads * dim], dim=-1)
    q = q.view(batch, seq, heads, dim).transpose(1, 2) * dim ** -0.25
    key = key.view(batch, seq, kv_heads, dim).transpose(1, 2) * dim ** -0.25
    value_gates, value_chosen = sigmoid_top_k(x, switch.value_selection, kv_heads, k)
    every_value = torch.einsum("bld,hedf->blhef", x, switch.value_experts)
    v = torch.einsum("blhe,blhef->bhlf", value_gates, every_value)
    group = heads // kv_heads
    key, v = key.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    scores = (q @ key.transpose(-1, -2)).masked_fill(~causal, float("-inf"))
    o = (scores.softmax(-1) @ v).transpose(1, 2)  # [batch, seq, heads, dim]
    output_gates, output_chosen = sigmoid_top_k(x, switch.output_selection, heads, k)
    every_output = torch.einsum("bthf,hefd->bthed", o, switch.output_experts)
    y = torch.einsum("bthe,bthed->btd", output_gates, every_output)
    return y, value_chosen, output_chosen


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("overrides", [dict(), dict(n_heads=2, n_attention_experts=5, top_k_attention_experts=3),
                                       dict(n_kv_heads=2)], ids=["H4E4k2", "H2E5k3", "GQA"])
def test_sparse_dispatch_equals_the_released_module_outputs_selections_and_gradients(overrides, dtype, tol):
    attention = layer(dtype, **overrides)
    x = torch.randn(2, 9, 32, dtype=dtype, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    y, record = attention(x)
    y.square().sum().backward()
    params = [x, *attention.parameters()]
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    want, value_chosen, output_chosen = reference_switch_head(x, attention)
    want.square().sum().backward()
    torch.testing.assert_close(y, want, rtol=tol, atol=tol)
    assert torch.equal(record.value_experts.expert_indices.sort(-1).values, value_chosen.sort(-1).values)
    assert torch.equal(record.output_experts.expert_indices.sort(-1).values, output_chosen.sort(-1).values)
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("expert_by_expert", [True, False], ids=["expert-by-expert", "grouped_mm"])
@pytest.mark.parametrize("d_in,d_out", [(16, 8), (8, 16)], ids=["gate-products", "gate-rows"])
def test_routed_matmul_equals_a_loop_over_assignments(monkeypatch, expert_by_expert, d_in, d_out):
    import gohgraph.ops.grouped_matmul as ops

    monkeypatch.setattr(ops, "EXPERT_BY_EXPERT_DEVICES", ("cpu",) if expert_by_expert else ())
    monkeypatch.setattr(ops, "EXPERT_BY_EXPERT_MIN_ROWS", 0)  # 11 assignments: few, but take the loop
    generator = torch.Generator().manual_seed(0)
    rows, weights = torch.randn(5, d_in, generator=generator), torch.randn(3, d_in, d_out, generator=generator)
    expert_ids = torch.randint(0, 3, (11,), generator=generator)
    gates, row_index = torch.rand(11, generator=generator), torch.randint(0, 5, (11,), generator=generator)
    out_index = torch.randint(0, 4, (11,), generator=generator)
    leaves = [t.clone().requires_grad_() for t in (rows, weights, gates)]
    want = torch.zeros(4, d_out)
    for a in range(11):
        want[out_index[a]] += leaves[2][a] * leaves[0][row_index[a]] @ leaves[1][expert_ids[a]]
    want_grads = torch.autograd.grad(want.pow(2).sum(), leaves)
    got_leaves = [t.clone().requires_grad_() for t in (rows, weights, gates)]
    got = routed_matmul(got_leaves[0], got_leaves[1], expert_ids, got_leaves[2], row_index, out_index, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(torch.autograd.grad(got.pow(2).sum(), got_leaves), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_only_the_chosen_experts_are_multiplied(monkeypatch):
    import gohgraph.ops.grouped_matmul as ops

    seen = []
    real = ops.grouped_matmul
    monkeypatch.setattr(ops, "EXPERT_BY_EXPERT_DEVICES", ())
    monkeypatch.setattr(ops, "grouped_matmul", lambda rows, *rest: seen.append(rows.shape[0]) or real(rows, *rest))
    attention = layer(n_attention_experts=8, top_k_attention_experts=2)
    attention(torch.randn(2, 5, 32))
    assert seen == [2 * 5 * 4 * 2, 2 * 5 * 4 * 2]  # batch * seq * heads * k rows, not * E


def test_expert_by_expert_multiplies_only_the_chosen_experts(monkeypatch):
    """The CPU loop's FLOPs: the selection (every expert scored) plus k of E experts' products."""
    import gohgraph.ops.grouped_matmul as ops
    from gohgraph.analysis.flops import count_flops

    monkeypatch.setattr(ops, "EXPERT_BY_EXPERT_MIN_ROWS", 0)
    assert ops.adds_expert_by_expert(torch.device("cpu"), 1, 8)

    projections = layer(n_attention_experts=8, top_k_attention_experts=2).switch_head
    tokens, heads_out = torch.randn(2, 5, 32), torch.randn(2, 5, 4, 8)
    selection = 2 * (2 * 5) * 32 * (4 * 8)  # tokens x d_model x (heads * E)
    chosen = 2 * (2 * 5 * 4 * 2) * 32 * 8  # (tokens * heads * k) x d_model x head_dim
    assert count_flops(lambda: projections.values(tokens))[0] == selection + chosen
    assert count_flops(lambda: projections.output(heads_out, tokens))[0] == selection + chosen


def test_the_loop_runs_only_with_many_rows_per_expert_on_cpu():
    from gohgraph.ops.grouped_matmul import EXPERT_BY_EXPERT_MIN_ROWS, adds_expert_by_expert

    cpu = torch.device("cpu")
    assert adds_expert_by_expert(cpu, 20 * EXPERT_BY_EXPERT_MIN_ROWS, 20)  # a 1,024-token training step
    assert not adds_expert_by_expert(cpu, 8, 20)  # a decode step: one grouped_mm
    assert not adds_expert_by_expert(torch.device("meta"), 10 ** 6, 20)  # CUDA and others: grouped_mm


def switch_model(**overrides) -> GoHTransformer:
    torch.manual_seed(0)
    return GoHTransformer(GoHConfig(**{**TINY, **SWITCH, **overrides})).eval()


ROUTED = dict(router="linear", n_shared_heads=1, top_k_heads=2)


@pytest.mark.parametrize("overrides", [dict(), dict(n_kv_heads=2), ROUTED], ids=["MHA", "GQA", "MoH"])
def test_changing_later_tokens_never_changes_earlier_outputs(overrides):
    assert_later_tokens_change_no_earlier_logit(switch_model(**overrides), vocab_size=32)


@pytest.mark.parametrize("overrides", [dict(), dict(n_kv_heads=2), dict(sliding_window=6), ROUTED],
                         ids=["MHA", "GQA", "window", "MoH"])
def test_cached_decoding_equals_recompute(overrides):
    model = switch_model(**overrides)
    prompt = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(6))
    cached = model.generate(prompt, max_new_tokens=8, temperature=0.0, use_cache=True)
    recomputed = model.generate(prompt, max_new_tokens=8, temperature=0.0, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_routing_record_gives_expert_load_per_head():
    model = switch_model(n_kv_heads=2)
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        records = model(ids).routing
    for record in records:
        value, output = record.value_experts, record.output_experts
        assert value.expert_indices.shape == (2, 7, 2, 2) and output.expert_indices.shape == (2, 7, 4, 2)
        load = torch.nn.functional.one_hot(output.expert_indices, 4).sum(dim=(0, 1, 3))  # [heads, E]
        assert load.shape == (4, 4) and torch.all(load.sum(-1) == 2 * 7 * 2)
        assert torch.all((output.expert_weights > 0) & (output.expert_weights < 1))
        assert record.experts is None and not record.aux_losses  # no balance loss


def test_checkpoints_without_switch_head_keep_their_parameters():
    plain = dict(GoHTransformer(GoHConfig(**TINY)).named_parameters())
    assert not any("switch_head" in name for name in plain)
    switch = dict(switch_model().named_parameters())
    assert "blocks.0.attn.out.weight" in plain and "blocks.0.attn.out.weight" not in switch
    assert switch["blocks.0.attn.qkv.weight"].shape == (8 * 8, 32)  # queries and keys only
    assert switch["blocks.0.attn.switch_head.value_experts"].shape == (4, 4, 32, 8)


@pytest.mark.parametrize("overrides, field", [
    (dict(n_attention_experts=1), "n_attention_experts"),
    (dict(top_k_attention_experts=5), "top_k_attention_experts"),
    (dict(attention="mla"), "attention"),
    (dict(talking_heads=True), "talking_heads"),
    (dict(linear="bitnet"), "linear"),
    (dict(linear_bias=True), "linear_bias"),
])
def test_combinations_it_cannot_do_are_refused(overrides, field):
    with pytest.raises(ValueError, match=field):
        GoHConfig(**{**TINY, **SWITCH, **overrides})


def test_tensor_parallel_refuses_switch_head():
    from gohgraph.parallel.tensor_parallel import check_tensor_parallel_layout

    with pytest.raises(ValueError, match=r"^tensor_parallel=2 does not shard n_attention_experts"):
        check_tensor_parallel_layout(switch_model(), 2)


def test_switch_head_row_of_the_comparison():
    from gohgraph.experiments.variants import SETTINGS, SWITCH_HEAD, comparison_variants, match_parameters, reference_of

    variants = comparison_variants(**SETTINGS["quick"][0], names=["dense", SWITCH_HEAD])
    row = variants[SWITCH_HEAD]
    assert row.n_attention_experts >= 2 and row.router == "dense" and row.ffn == "dense"
    assert "SwitchHead" in reference_of(row) and "SwitchHead" not in reference_of(variants["dense"])
    assert abs(match_parameters(variants)[SWITCH_HEAD].mismatch) <= 0.02
