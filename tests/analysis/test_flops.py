"""FLOPs counted, not assumed (docs/skipping-work.md): the counter's formulas for CPU SDPA and grouped mm,
a dense step against its closed form, head-sparse attention in proportion to the active (token,
head) pairs, and a gathered Mixture-of-Recursions step in proportion to the tokens it keeps."""

import pytest
import torch
import torch.nn.functional as F

import gohgraph.layers.head_sparse as head_sparse
from gohgraph import GoHConfig, GoHTransformer
from gohgraph.analysis.flops import count_flops
from gohgraph.layers.head_sparse import head_sparse_attention


def causal_pairs(n):
    return n * (n + 1) // 2


def test_cpu_sdpa_is_counted_over_the_pairs_it_computes():
    q, k, v = (torch.randn(2, 3, 10, 8, requires_grad=True) for _ in range(3))
    causal, per_op = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert causal == 2 * 2 * 3 * causal_pairs(10) * (8 + 8)
    masked, _ = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(10, 10).tril().bool()))
    assert masked == 2 * 2 * 3 * 10 * 10 * 16  # a masked call computes every pair
    both, per_op = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward())
    assert both - causal == 2 * 2 * 3 * causal_pairs(10) * (8 + 2 * 8 + 2 * 8)  # five products in backward


def test_grouped_mm_counts_each_row_against_its_group():
    x = torch.randn(12, 8)
    w = torch.randn(3, 8, 4)
    offsets = torch.tensor([5, 9, 12], dtype=torch.int32)
    flops, _ = count_flops(lambda: F.grouped_mm(x, w, offs=offsets))
    assert flops == 2 * 12 * 8 * 4


def test_a_dense_training_step_matches_its_closed_form():
    cfg = GoHConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    model = GoHTransformer(cfg)
    batch, seq, d, h = 2, 24, cfg.d_model, cfg.hidden_dim
    ids = torch.randint(0, 64, (batch, seq))
    flops, _ = count_flops(lambda: model(ids, labels=ids).loss.backward())
    tokens = batch * seq
    linear = 2 * tokens * (d * 3 * d + d * d + 3 * d * h) * cfg.n_layers + 2 * tokens * d * cfg.vocab_size
    core_forward = 2 * batch * cfg.n_heads * causal_pairs(seq) * 2 * cfg.head_dim * cfg.n_layers
    # backward: each matmul twice (input and weight gradients); the core: five products for two
    assert flops == 3 * linear + core_forward + core_forward * 5 // 2


def test_head_sparse_core_flops_follow_the_active_pairs(monkeypatch):
    """Every routed head active on exactly half of each chunk: the prefix work is exactly
    active pairs x prefix keys, the diagonal and the shared heads are what they are in dense."""
    monkeypatch.setattr(head_sparse, "QUERY_CHUNK", 8)
    batch, heads, shared, seq, dim = 1, 6, 2, 32, 8
    q, k, v = (torch.randn(batch, heads, seq, dim) for _ in range(3))
    positions = torch.arange(seq)[:, None] + torch.arange(heads)[None, :]
    active = (positions % 2 == 0)[None]  # [1, seq, heads]
    active[..., :shared] = True
    flops, _ = count_flops(lambda: head_sparse_attention(q, k, v, active, shared, None, True, True, None))
    per_pair = 2 * (dim + dim)
    routed, chunk = heads - shared, 8
    expected = shared * causal_pairs(seq) * per_pair  # shared heads: SDPA's causal kernel
    expected += (seq // chunk) * routed * causal_pairs(chunk) * per_pair  # diagonal blocks
    expected += sum(routed * (chunk // 2) * start for start in range(chunk, seq, chunk)) * per_pair  # prefixes
    assert flops == expected
    dense, _ = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert flops < dense


@pytest.mark.parametrize("router", ["linear", "graph"])
def test_a_decode_step_reads_only_the_active_heads(router):
    cfg = GoHConfig(vocab_size=64, d_model=48, n_layers=2, n_heads=6, n_shared_heads=2, top_k_heads=1,
                    router=router, max_seq_len=64, head_execution="sparse")
    torch.manual_seed(0)
    model = GoHTransformer(cfg).eval()
    cache = model.new_cache("static", 40)
    with torch.inference_mode():
        model(torch.randint(0, 64, (1, 30)), cache=cache)
        flops = {}
        for mode in ("sparse", "masked"):
            model.set_execution(head_execution=mode)
            cache.lengths = [30] * cfg.n_layers  # rewind: every call attends over 31 keys
            out = model(torch.tensor([[5]]), cache=cache)
            cache.lengths = [30] * cfg.n_layers
            flops[mode], per_op = count_flops(lambda: model(torch.tensor([[5]]), cache=cache))
            if mode == "masked":
                masked_core = sum(n for op, n in per_op.items() if "scaled_dot_product" in op)
    per_head = 2 * 31 * (cfg.head_dim + cfg.head_dim)
    active_heads = int((out.routing[0].head_gates != 0).sum() + (out.routing[1].head_gates != 0).sum())
    assert active_heads == 2 * (2 + 1)
    assert masked_core == per_head * cfg.n_heads * cfg.n_layers
    # everything else (the projections included) is the same work in both modes: the difference is
    # the skipped heads' attention
    assert flops["masked"] - flops["sparse"] == per_head * (cfg.n_heads * cfg.n_layers - active_heads)


@pytest.mark.parametrize("router", ["expert-choice", "token-choice"])
def test_a_gathered_recursion_step_costs_in_proportion_to_the_kept_tokens(router):
    cfg = GoHConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, recursion="mor",
                    max_recursions=3, recursion_router=router)
    torch.manual_seed(0)
    model = GoHTransformer(cfg)
    with torch.no_grad():
        for param in model.recursion.router.parameters():
            param.mul_(200.0)
    ids = torch.randint(0, 64, (1, 30))
    linear = {}
    for mode in ("masked", "gather"):
        model.set_execution(recursion_execution=mode)
        with torch.no_grad():
            out = model(ids)
            _, per_op = count_flops(lambda: model(ids))
        linear[mode] = per_op.get("aten.mm", 0) + per_op.get("aten.addmm", 0)
    d, h = cfg.d_model, cfg.hidden_dim
    per_token_block = 2 * (d * 3 * d + d * d + 3 * d * h)
    selected = out.recursion.selected  # [recursions, batch, seq]
    skipped = int((~selected[1:]).sum())
    assert 0 < skipped < selected[1:].numel()
    # token-choice pads each gathered run to its busiest row: batch 1 has no padding
    assert linear["masked"] - linear["gather"] == per_token_block * cfg.n_layers * skipped
