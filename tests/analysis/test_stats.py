"""Routing statistics against independent counts, hand-made loads and one-shot aggregation."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gohgraph import ExpertRouting, GoHConfig, GoHTransformer, LayerRouting
from gohgraph.analysis.stats.collect import RoutingStats, collect_routing_stats
from gohgraph.analysis.stats.drift import routing_drift
from gohgraph.analysis.stats.metrics import coefficient_of_variation, load_balance_summary, load_entropy
from gohgraph.graph import head_graph

MOE_CFG = GoHConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2,
                    router="linear", ffn="mh-moe", n_experts=6, n_shared_experts=1, n_subtokens=2,
                    top_k_experts=2, capacity_factor=1.0)
GRAPH_CFG = GoHConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2,
                      router="graph", router_rounds=1, head_graph="ring")


def layer_record(head_gates, **expert_fields):
    """A LayerRouting whose expert fields, if any, form its experts part."""
    experts = ExpertRouting(**expert_fields) if expert_fields else None
    return LayerRouting(head_gates=head_gates, experts=experts)


def synthetic_records(cfg, batch, seq, generator):
    """Random but valid LayerRouting records with every expert field filled."""
    records = []
    for _ in range(cfg.n_layers):
        gates = torch.rand(batch, seq, cfg.n_heads, generator=generator, dtype=torch.float64) + 0.1
        gates[..., cfg.n_shared_heads:] *= torch.rand(batch, seq, cfg.n_routed_heads, generator=generator) > 0.5
        scores = torch.rand(batch, seq, cfg.n_subtokens, cfg.n_routed_experts, generator=generator)
        scores[..., -1] = -1.0  # the last routed expert is never chosen: a dead expert
        weights, indices = scores.topk(cfg.top_k_experts, dim=-1)
        drops = torch.rand(indices.shape, generator=generator) < 0.2
        records.append(layer_record(
            head_gates=gates.float(),
            expert_indices=indices,
            expert_weights=weights / weights.sum(-1, keepdim=True),
            dropped=drops.all(-1),
            expert_drops=drops,
        ))
    return records


def concat_records(batches):
    layers = []
    for per_layer in zip(*batches):
        fields = {}
        for name in ("head_gates", "expert_indices", "expert_weights", "dropped", "expert_drops"):
            fields[name] = torch.cat([getattr(record, name) for record in per_layer], dim=0)
        layers.append(layer_record(**fields))
    return layers


def assert_reports_close(a, b, path="report"):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            if key != "batches":
                assert_reports_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_reports_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


# ---------------------------------------------------------------------- balance metrics
def test_load_entropy_is_one_for_uniform_load():
    assert load_entropy(torch.full((8,), 0.125)) == pytest.approx(1.0)
    assert load_entropy(torch.tensor([3.0, 3.0, 3.0])) == pytest.approx(1.0)  # raw counts work too
    assert coefficient_of_variation(torch.ones(5)) == pytest.approx(0.0)


def test_load_metrics_of_a_hand_made_skewed_load():
    load = torch.tensor([0.5, 0.25, 0.25, 0.0])
    # -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) / ln 4 = 1.5 ln 2 / (2 ln 2)
    assert load_entropy(load) == pytest.approx(0.75)
    # mean 0.25, deviations (0.25, 0, 0, -0.25): std = sqrt(0.125 / 4)
    assert coefficient_of_variation(load) == pytest.approx(math.sqrt(0.125 / 4) / 0.25)
    summary = load_balance_summary(load)
    assert summary["max_over_mean_load"] == pytest.approx(2.0)
    assert summary["min_over_mean_load"] == pytest.approx(0.0)
    assert summary["top20_share"] == pytest.approx(0.5)  # ceil(0.2 * 4) = 1 node
    assert summary["bottom20_share"] == pytest.approx(0.0)
    assert summary["dead"] == [3]
    assert load_entropy(torch.tensor([0.0, 1.0, 0.0])) == pytest.approx(0.0)


# ---------------------------------------------------------------------- streaming
def test_streaming_statistics_equal_one_shot_statistics():
    generator = torch.Generator().manual_seed(0)
    batches = [synthetic_records(MOE_CFG, batch, 5, generator) for batch in (2, 3, 1)]
    ids = [torch.randint(0, MOE_CFG.vocab_size, (batch, 5), generator=generator) for batch in (2, 3, 1)]
    streamed = RoutingStats(MOE_CFG)
    for records, batch_ids in zip(batches, ids):
        streamed.update(records, batch_ids)
    one_shot = RoutingStats(MOE_CFG)
    one_shot.update(concat_records(batches), torch.cat(ids))
    assert streamed.batches == 3 and one_shot.batches == 1
    report = streamed.report()
    assert "top_tokens" in report["layers"][0]["heads"] and "top_tokens" in report["layers"][0]["experts"]
    assert_reports_close(report, one_shot.report())


@settings(max_examples=12, deadline=None)
@given(batch_sizes=st.lists(st.integers(1, 3), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_any_split_into_batches_gives_the_same_report(batch_sizes, seed):
    generator = torch.Generator().manual_seed(seed)
    batches = [synthetic_records(MOE_CFG, batch, 3, generator) for batch in batch_sizes]
    streamed = RoutingStats(MOE_CFG)
    for records in reversed(batches):  # order does not matter either
        streamed.update(records)
    one_shot = RoutingStats(MOE_CFG)
    one_shot.update(concat_records(batches))
    assert_reports_close(streamed.report(), one_shot.report())


def test_update_leaves_the_thread_count_as_it_was():
    threads = torch.get_num_threads()
    stats = RoutingStats(MOE_CFG)
    stats.update(synthetic_records(MOE_CFG, 1, 2, torch.Generator().manual_seed(0)))
    assert torch.get_num_threads() == threads


def test_head_statistics_equal_an_independent_count():
    torch.manual_seed(0)
    model = GoHTransformer(GRAPH_CFG)
    batches = [torch.randint(0, 64, (2, 12)) for _ in range(3)]
    report = collect_routing_stats(model, batches, progress=False).report()

    with torch.no_grad():
        gates = [torch.cat([model(ids).routing[layer].head_gates for ids in batches]).reshape(-1, 4).numpy()
                 for layer in range(GRAPH_CFG.n_layers)]
    for layer, layer_gates in enumerate(gates):
        heads = report["layers"][layer]["heads"]
        n_tokens = layer_gates.shape[0]
        for head in range(4):
            active_tokens = sum(1 for token in range(n_tokens) if layer_gates[token, head] > 0)
            assert heads["activation_count"][head] == active_tokens
            assert heads["activation_frequency"][head] == pytest.approx(active_tokens / n_tokens)
            assert heads["mean_gate"][head] == pytest.approx(float(layer_gates[:, head].mean()), rel=1e-6)
            for other in range(4):
                both = sum(1 for token in range(n_tokens)
                           if layer_gates[token, head] > 0 and layer_gates[token, other] > 0)
                assert heads["coactivation"][head][other] == pytest.approx(both / n_tokens)
        assert heads["activation_frequency"][0] == 1.0  # the shared head is always on
        assert heads["active_per_token"] == pytest.approx(1 + GRAPH_CFG.top_k_heads)
        routed_counts = np.array(heads["activation_count"][1:], dtype=float)
        assert heads["routed_load"] == pytest.approx(list(routed_counts / routed_counts.sum()))
        assert heads["load_entropy"] == pytest.approx(load_entropy(torch.tensor(routed_counts)))


def test_flow_means_follow_the_head_graph_edge_order():
    torch.manual_seed(1)
    model = GoHTransformer(GRAPH_CFG)
    ids = torch.randint(0, 64, (3, 10))
    report = collect_routing_stats(model, [ids], progress=False).report()
    edges = head_graph("ring", 4)
    assert report["head_edges"] == edges.t().tolist()
    with torch.no_grad():
        routing = model(ids).routing
    for layer, record in enumerate(routing):
        flow = record.flow.reshape(-1, edges.shape[1]).double()
        active = (record.head_gates.reshape(-1, 4) > 0).double()
        src, dst = edges
        flow_report = report["layers"][layer]["flow"]
        assert flow_report["mean_flow"] == pytest.approx(flow.mean(0).tolist(), rel=1e-6)
        effective = flow * active[:, dst]
        assert flow_report["mean_effective_flow"] == pytest.approx(effective.mean(0).tolist(), rel=1e-6)
        both = (active[:, src] * active[:, dst]).sum(0).clamp(min=1)
        assert flow_report["mean_flow_when_active"] == pytest.approx((effective.sum(0) / both).tolist(), rel=1e-6)
        assert max(flow_report["mean_flow_when_active"]) <= 1.0 + 1e-6  # softmax weights


def test_expert_statistics_of_hand_made_records():
    cfg = GoHConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, router="dense", ffn="mh-moe",
                    n_experts=5, n_shared_experts=1, n_subtokens=2, top_k_experts=1)
    # 3 tokens x 2 sub-tokens, top-1: expert ids (0, 0), (0, 1), (2, 0); expert 3 never chosen
    indices = torch.tensor([[[[0], [0]], [[0], [1]], [[2], [0]]]])
    drops = torch.tensor([[[[False], [True]], [[False], [False]], [[True], [False]]]])
    record = layer_record(head_gates=torch.ones(1, 3, 2), expert_indices=indices,
                          expert_weights=torch.ones(1, 3, 2, 1), dropped=drops[..., 0], expert_drops=drops)
    stats = RoutingStats(cfg)
    stats.update([record], torch.zeros(1, 3, dtype=torch.long))
    experts = stats.report()["layers"][0]["experts"]
    assert experts["assignments"] == 6
    assert experts["assignment_count"] == [4, 1, 1, 0]
    assert experts["load"] == pytest.approx([4 / 6, 1 / 6, 1 / 6, 0.0])
    assert experts["utilisation"] == pytest.approx([16 / 6, 4 / 6, 4 / 6, 0.0])
    assert experts["dead"] == [3]
    assert experts["top20_share"] == pytest.approx(4 / 6)  # ceil(0.2 * 4) = 1 expert
    assert experts["bottom20_share"] == pytest.approx(0.0)
    assert np.allclose(experts["subtoken_load"], [[2 / 3, 0, 1 / 3, 0], [2 / 3, 1 / 3, 0, 0]])
    assert experts["drop_rate"] == pytest.approx(2 / 6)
    assert experts["assignment_drop_rate"] == pytest.approx(2 / 6)
    assert experts["expert_drop_rate"] == pytest.approx([1 / 4, 0.0, 1.0, 0.0])
    assert experts["load_entropy"] == pytest.approx(load_entropy(torch.tensor([4.0, 1, 1, 0])))


def test_top_tokens_per_head_and_expert_equal_a_hand_count():
    cfg = GoHConfig(vocab_size=8, d_model=32, n_layers=1, n_heads=2, n_shared_heads=1, router="linear",
                    ffn="moe", n_experts=2, top_k_experts=1)
    gates = torch.tensor([[[1.0, 0.5], [1.0, 0.7], [1.0, 0.2], [1.0, 0.0]]])  # head 1 off at token 3
    record = layer_record(head_gates=gates, expert_indices=torch.tensor([[[[0]], [[0]], [[1]], [[0]]]]))
    ids = torch.tensor([[3, 3, 5, 1]])
    stats = RoutingStats(cfg)
    stats.update([record], ids)
    layer = stats.report()["layers"][0]
    assert layer["heads"]["top_tokens"][1] == [[3, pytest.approx(2 / 3)], [5, pytest.approx(1 / 3)]]
    assert layer["heads"]["top_tokens"][0][0] == [3, 0.5]  # then 5 and 1 tie at 0.25
    assert layer["experts"]["top_tokens"] == [[[3, pytest.approx(2 / 3)], [1, pytest.approx(1 / 3)]], [[5, 1.0]]]
    with pytest.raises(ValueError, match="every update"):
        stats.update([record])
    with pytest.raises(ValueError, match="vocab_size"):
        RoutingStats(cfg).update([record], ids + 5)


def test_token_profiles_are_skipped_for_huge_vocabularies():
    cfg = GoHConfig(vocab_size=1 << 21, d_model=32, n_layers=2, n_heads=4, router="dense")
    stats = RoutingStats(cfg)
    stats.update([layer_record(head_gates=torch.ones(1, 2, 4))] * 2, torch.tensor([[7, 1 << 20]]))
    assert "top_tokens" not in stats.report()["layers"][0]["heads"]


def test_expert_gate_mass_is_absent_without_recorded_weights():
    cfg = GoHConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, router="dense", ffn="moe",
                    n_experts=3, top_k_experts=1)
    record = layer_record(head_gates=torch.ones(1, 2, 2), expert_indices=torch.tensor([[[[0]], [[2]]]]))
    stats = RoutingStats(cfg)
    stats.update([record])
    experts = stats.report()["layers"][0]["experts"]
    assert experts["load"] == [0.5, 0.0, 0.5]
    assert "gate_mass" not in experts and "weight_share" not in experts and "drop_rate" not in experts


def test_dense_router_without_experts_reports_every_head_active_and_no_expert_section():
    cfg = GoHConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, router="dense")
    torch.manual_seed(0)
    report = collect_routing_stats(GoHTransformer(cfg), [torch.randint(0, 64, (2, 8))], progress=False).report()
    for layer in report["layers"]:
        assert layer["heads"]["activation_frequency"] == [1.0] * 4
        assert layer["heads"]["load_entropy"] == pytest.approx(1.0)
        assert layer["heads"]["dead"] == []
        assert "experts" not in layer and "flow" not in layer
    assert "expert_load_cv" not in report["summary"] and "dead_experts" not in report["summary"]
    assert report["tokens"] == 16 and report["head_edges"] == []


def test_json_and_csv_exports_hold_the_report(tmp_path):
    stats = RoutingStats(MOE_CFG)
    generator = torch.Generator().manual_seed(3)
    stats.update(synthetic_records(MOE_CFG, 2, 4, generator), torch.randint(0, 64, (2, 4), generator=generator))
    report = stats.report()
    assert json.loads(stats.to_json(tmp_path / "s.json").read_text()) == report
    with stats.to_csv(tmp_path / "s.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    loads = {int(r["item"]): float(r["value"]) for r in rows
             if r["layer"] == "1" and r["group"] == "expert" and r["metric"] == "load"}
    assert [loads[e] for e in range(MOE_CFG.n_routed_experts)] == report["layers"][1]["experts"]["load"]
    freq = [float(r["value"]) for r in rows
            if r["layer"] == "0" and r["group"] == "head" and r["metric"] == "activation_frequency"]
    assert freq == report["layers"][0]["heads"]["activation_frequency"]
    top = {(r["item"], r["metric"]): float(r["value"]) for r in rows if r["layer"] == "0" and r["group"] == "expert_token"}
    first_token, first_share = report["layers"][0]["experts"]["top_tokens"][2][0]
    assert top[("2#0", "token_id")] == first_token and top[("2#0", "share")] == first_share
    drop = [float(r["value"]) for r in rows if r["metric"] == "expert_drop_rate" and r["group"] == "layer"]
    assert drop == [layer["experts"]["drop_rate"] for layer in report["layers"]]


def test_bad_records_raise_clear_errors_and_change_nothing():
    stats = RoutingStats(MOE_CFG)
    generator = torch.Generator().manual_seed(0)
    stats.update(synthetic_records(MOE_CFG, 1, 3, generator))
    before = stats.report()
    records = synthetic_records(MOE_CFG, 1, 3, generator)
    with pytest.raises(ValueError, match="n_layers=2"):
        stats.update(records[:1])
    records[1].experts.expert_indices = records[1].expert_indices + MOE_CFG.n_routed_experts  # the last layer is bad
    with pytest.raises(ValueError, match="layer 1: expert_indices must lie in 0..4"):
        stats.update(records)
    records[1].experts = None
    with pytest.raises(ValueError, match="differ from earlier batches"):
        stats.update(records)
    assert stats.report() == before  # layer 0 of the rejected batches was not counted
    with pytest.raises(ValueError, match="no routing records"):
        RoutingStats(MOE_CFG).report()


def test_collect_routing_stats_restores_training_mode():
    model = GoHTransformer(GRAPH_CFG).train()
    collect_routing_stats(model, [torch.randint(0, 64, (1, 4))], progress=False)
    assert model.training


# ---------------------------------------------------------------------- drift
class RecordedRouter(nn.Module):
    """A stand-in model whose routing is a fixed function of the input ids (for drift tests)."""

    def __init__(self, cfg, head_sets, expert_sets):
        super().__init__()
        self.config, self.anchor = cfg, nn.Parameter(torch.zeros(()))
        self.head_sets, self.expert_sets = head_sets, expert_sets  # per layer: id -> gates / experts

    def forward(self, input_ids):
        routing = [layer_record(head_gates=heads[input_ids], expert_indices=experts[input_ids])
                   for heads, experts in zip(self.head_sets, self.expert_sets)]
        return type("Out", (), {"routing": routing})()


def test_routing_drift_counts_tokens_whose_sets_change():
    cfg = GoHConfig(vocab_size=4, d_model=8, n_layers=2, n_heads=2, router="linear", ffn="moe",
                    n_experts=3, top_k_experts=2)
    heads_a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    heads_b = torch.tensor([[0.5, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # id 1 changes its head
    experts_a = torch.tensor([[[0, 1]], [[1, 2]], [[0, 2]], [[2, 1]]])
    experts_b = torch.tensor([[[1, 0]], [[1, 2]], [[0, 1]], [[2, 1]]])  # id 2 changes; id 0 only reorders
    model_a = RecordedRouter(cfg, [heads_a, heads_a], [experts_a, experts_a])
    model_b = RecordedRouter(cfg, [heads_b, heads_a], [experts_b, experts_a])
    ids = torch.tensor([[0, 1, 2, 3], [1, 1, 3, 3]])  # id 1 three times, id 2 once, of 8 tokens
    drift = routing_drift(model_a, model_b, [ids])
    assert drift["tokens"] == 8
    assert drift["layers"][0] == {"layer": 0, "head_drift": 3 / 8, "expert_drift": 1 / 8}
    assert drift["layers"][1] == {"layer": 1, "head_drift": 0.0, "expert_drift": 0.0}
    assert drift["head_drift"] == pytest.approx(3 / 16)
    assert drift["token_drift"] == pytest.approx(4 / 8)
    assert routing_drift(model_a, model_a, [ids])["token_drift"] == 0.0


def test_routing_drift_of_real_checkpoints():
    torch.manual_seed(0)
    model_a, model_b = GoHTransformer(GRAPH_CFG), GoHTransformer(GRAPH_CFG)
    ids = torch.randint(0, 64, (2, 16))
    drift = routing_drift(model_a, model_b, [ids])
    with torch.no_grad():
        sets_a = [(r.head_gates > 0).reshape(-1, 4) for r in model_a(ids).routing]
        sets_b = [(r.head_gates > 0).reshape(-1, 4) for r in model_b(ids).routing]
    for layer in range(2):
        expected = float((sets_a[layer] != sets_b[layer]).any(-1).double().mean())
        assert drift["layers"][layer]["head_drift"] == pytest.approx(expected)
    assert "expert_drift" not in drift
    with pytest.raises(ValueError, match="n_heads"):
        routing_drift(model_a, GoHTransformer(GRAPH_CFG.replace(n_heads=2, n_shared_heads=0, top_k_heads=1)), [ids])


def test_recursion_stats_count_depths_per_token_and_name_each_block_application():
    from gohgraph.analysis.stats.collect import collect_routing_stats
    from gohgraph.models.recursion import block_applications

    torch.manual_seed(0)
    cfg = GoHConfig(vocab_size=16, d_model=32, n_layers=3, n_heads=4, max_seq_len=32, recursion="mor",
                    max_recursions=3, recursion_router="token-choice", recursion_sharing="middle-cycle")
    model = GoHTransformer(cfg).eval()
    with torch.no_grad():
        model.recursion.router.proj.weight.mul_(300.0)  # depths spread over 1..3
    batches = [torch.randint(0, 16, (2, 10)) for _ in range(3)]
    stats = collect_routing_stats(model, batches, progress=False)
    report = stats.report()
    assert [(a["block"], a["recursion"]) for a in report["block_applications"]] == block_applications(cfg) \
        == [(0, 0), (1, 0), (1, 1), (1, 2), (2, 0)]
    assert len(report["layers"]) == 5
    with torch.no_grad():
        depths = torch.cat([model(ids).recursion.depth.reshape(-1) for ids in batches])
        ids = torch.cat([ids.reshape(-1) for ids in batches])
    recursion = report["recursion"]
    expected = [(depths == d).double().mean().item() for d in (1, 2, 3)]
    assert recursion["depth_histogram"] == pytest.approx(expected) and min(expected) > 0
    assert recursion["mean_depth"] == pytest.approx(depths.double().mean().item())
    assert recursion["took_recursion"] == pytest.approx([1.0, expected[1] + expected[2], expected[2]])
    token, mean_depth = recursion["deepest_tokens"][0]
    assert mean_depth == pytest.approx(depths[ids == token].double().mean().item())
    with pytest.raises(ValueError, match="pass out.recursion"):
        stats.update(model(batches[0]).routing, batches[0])
