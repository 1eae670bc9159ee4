"""Statistics of the attention baselines that route inside a head: SwitchHead's expert load per head
(value and output side) and MoSA's share of tokens each sparse head keeps; padding counts nowhere."""

import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.analysis.stats.collect import collect_routing_stats

TINY = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)


def model_of(**overrides) -> GoHTransformer:
    torch.manual_seed(0)
    return GoHTransformer(GoHConfig(**{**TINY, **overrides})).eval()


def test_switch_head_expert_load_per_head_counts_every_choice():
    model = model_of(n_attention_experts=4, top_k_attention_experts=2, n_kv_heads=2)
    ids = torch.randint(0, 32, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        records = model(ids).routing
    report = collect_routing_stats(model, [ids], progress=False).report()
    assert (report["config"]["n_attention_experts"], report["config"]["top_k_attention_experts"]) == (4, 2)
    for layer, record in zip(report["layers"], records):
        for side, heads, choices in (("value", 2, record.value_experts), ("output", 4, record.output_experts)):
            stats = layer["attention_experts"][side]
            want = torch.nn.functional.one_hot(choices.expert_indices, 4).sum(dim=(0, 1, 3))  # [heads, E]
            assert stats["assignment_count"] == want.tolist()
            assert len(stats["load"]) == heads and all(abs(sum(row) - 1) < 1e-9 for row in stats["load"])
            assert len(stats["load_cv"]) == heads and all(cv >= 0 for cv in stats["load_cv"])
        assert "sparse_heads" not in layer


def test_mosa_kept_share_per_sparse_head_leaves_padding_out():
    model = model_of(n_mosa_heads=3, mosa_sparsity=4)
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        records = model(ids, attention_mask=mask).routing
    report = collect_routing_stats(model, [(ids, mask)], progress=False).report()
    assert (report["config"]["n_mosa_heads"], report["config"]["mosa_sparsity"]) == (3, 4)
    for layer, record in zip(report["layers"], records):
        kept = record.sparse_heads.selected[mask.bool()]  # [real tokens, sparse heads]
        stats = layer["sparse_heads"]
        assert stats["kept_count"] == kept.sum(0).tolist() and layer["tokens"] == 20
        assert stats["kept_share"] == [count / 20 for count in kept.sum(0).tolist()]
        assert all(0 < score < 1 for score, count in zip(stats["mean_score_kept"], stats["kept_count"]) if count)
        assert "attention_experts" not in layer
