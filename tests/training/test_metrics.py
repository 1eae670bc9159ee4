"""Per-step routing metrics agree with the statistics module (one CV function, routed nodes only)."""

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.analysis.stats.collect import collect_routing_stats
from gohgraph.training.metrics import routing_summary


@pytest.mark.parametrize("shared", [0, 2])
def test_expert_load_cv_counts_routed_experts_only(shared):
    """With n_experts=6 and 2 shared, metrics.csv said 0.796 and the stats module 0.299: the metric
    binned over all 6 experts, two of which (the shared ones) are never routed to."""
    cfg = GoHConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=32, ffn="moe",
                    n_experts=6, n_shared_experts=shared, top_k_experts=1)
    torch.manual_seed(0)
    model = GoHTransformer(cfg).eval()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        summary = routing_summary(model(ids).routing, cfg)
    report = collect_routing_stats(model, [ids], progress=False).report()
    assert summary["expert_load_cv"] == pytest.approx(report["layers"][0]["experts"]["load_cv"], rel=1e-9)
    counts = torch.bincount(model(ids).routing[0].expert_indices.reshape(-1), minlength=cfg.n_routed_experts).double()
    assert summary["expert_load_cv"] == pytest.approx((counts.std(unbiased=False) / counts.mean()).item(), rel=1e-9)
