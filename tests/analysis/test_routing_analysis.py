"""By source, across layers, per token id: every number against a count written out here, token by token.

The records are hand-made, with padding positions filled with routing that would change every
count if it leaked in.
"""

import csv
import math

import numpy as np
import pytest
import torch

from gohgraph import ExpertRouting, GoHConfig, GoHTransformer, LayerRouting
from gohgraph.analysis.stats.collect import (
    RoutingStats,
    collect_routing_stats,
    collect_routing_stats_by_source,
    routing_by_source,
)

CFG = GoHConfig(vocab_size=16, d_model=32, n_layers=3, n_heads=4, n_shared_heads=1, top_k_heads=2,
                router="linear", ffn="mh-moe", n_experts=6, n_shared_experts=1, n_subtokens=2, top_k_experts=2)
E, M, K, H, HS = CFG.n_routed_experts, CFG.n_subtokens, CFG.top_k_experts, CFG.n_heads, CFG.n_shared_heads
SOURCES = ["code", "prose", "math"]


def hand_made_batch(seed, batch=4, seq=6):
    """Records of every layer, ids, a left-padding mask and one source per row."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, seq + 1, (batch,), generator=g)
    mask = torch.arange(seq)[None, :] >= (seq - lengths)[:, None]  # left padding
    ids = torch.randint(0, CFG.vocab_size, (batch, seq), generator=g)
    records = []
    for _ in range(CFG.n_layers):
        gates = torch.rand(batch, seq, H, generator=g) + 0.05
        routed = torch.rand(batch, seq, H - HS, generator=g).argsort(-1) < CFG.top_k_heads
        gates[..., HS:] *= routed
        indices = torch.rand(batch, seq, M, E, generator=g).argsort(-1)[..., :K]
        weights = torch.rand(batch, seq, M, K, generator=g)
        weights = weights / weights.sum(-1, keepdim=True)
        # padding routes to one fixed choice with huge gates: any leak shows in every count
        gates[~mask] = 50.0
        indices[~mask] = torch.tensor([0, 1])
        records.append(LayerRouting(head_gates=gates, experts=ExpertRouting(expert_indices=indices,
                                                                           expert_weights=weights)))
    sources = [SOURCES[int(i)] for i in torch.randint(0, len(SOURCES), (batch,), generator=g)]
    return records, ids, mask, sources


def reference_counts(batches):
    """Per (layer, source) head/expert counts and gate masses, per source tokens, cross-layer pairs,
    per token-id routed-head / expert counts: loops over real tokens only."""
    L = CFG.n_layers
    ref = {"tokens": {s: 0 for s in SOURCES},
           "head_count": np.zeros((L, len(SOURCES), H)), "head_mass": np.zeros((L, len(SOURCES), H)),
           "expert_count": np.zeros((L, len(SOURCES), E)), "expert_mass": np.zeros((L, len(SOURCES), E)),
           "head_pairs": np.zeros((L - 1, H, H)), "expert_pairs": np.zeros((L - 1, E, E)),
           "token_heads": np.zeros((L, CFG.vocab_size, H - HS)), "token_experts": np.zeros((L, CFG.vocab_size, E)),
           "occurrences": np.zeros(CFG.vocab_size)}
    for records, ids, mask, sources in batches:
        for b in range(ids.shape[0]):
            s = SOURCES.index(sources[b])
            for t in range(ids.shape[1]):
                if not mask[b, t]:
                    continue
                ref["tokens"][sources[b]] += 1
                ref["occurrences"][int(ids[b, t])] += 1
                active, assigned = [], []
                for layer, record in enumerate(records):
                    gates = record.head_gates[b, t]
                    heads = [h for h in range(H) if gates[h] > 0]
                    active.append(heads)
                    for h in heads:
                        ref["head_count"][layer, s, h] += 1
                        ref["head_mass"][layer, s, h] += float(gates[h])
                        if h >= HS:
                            ref["token_heads"][layer, int(ids[b, t]), h - HS] += 1
                    experts = []
                    for sub in range(M):
                        for slot in range(K):
                            e = int(record.expert_indices[b, t, sub, slot])
                            experts.append(e)
                            ref["expert_count"][layer, s, e] += 1
                            ref["expert_mass"][layer, s, e] += float(record.expert_weights[b, t, sub, slot])
                            ref["token_experts"][layer, int(ids[b, t]), e] += 1
                    assigned.append(experts)
                for layer in range(L - 1):
                    for i in active[layer]:
                        for j in active[layer + 1]:
                            ref["head_pairs"][layer, i, j] += 1 / len(active[layer + 1])
                    for i in assigned[layer]:
                        for j in assigned[layer + 1]:
                            ref["expert_pairs"][layer, i, j] += 1 / len(assigned[layer + 1])
    return ref


@pytest.fixture(scope="module")
def batches():
    return [hand_made_batch(seed) for seed in range(3)]


@pytest.fixture(scope="module")
def report(batches):
    stats = RoutingStats(CFG, sources=SOURCES)
    for records, ids, mask, sources in batches:
        stats.update(records, ids, attention_mask=mask, source=sources)
    return stats.report()


@pytest.fixture(scope="module")
def ref(batches):
    return reference_counts(batches)


def test_by_source_counts_equal_an_independent_count(report, ref):
    by_source = report["by_source"]
    assert by_source["sources"] == SOURCES and by_source["tokens"] == ref["tokens"]
    assert sum(ref["tokens"].values()) == report["tokens"]  # padding is not among the tokens
    for layer, entry in enumerate(by_source["layers"]):
        for s, source in enumerate(SOURCES):
            n = ref["tokens"][source]
            heads, experts = entry["heads"], entry["experts"]
            np.testing.assert_allclose(heads["activation_count"][source], ref["head_count"][layer, s])
            np.testing.assert_allclose(heads["gate_mass"][source], ref["head_mass"][layer, s], rtol=1e-6)
            np.testing.assert_allclose(heads["activation_frequency"][source], ref["head_count"][layer, s] / n)
            np.testing.assert_allclose(experts["assignment_count"][source], ref["expert_count"][layer, s])
            np.testing.assert_allclose(experts["gate_mass"][source], ref["expert_mass"][layer, s], rtol=1e-6)
            np.testing.assert_allclose(experts["load"][source],
                                       ref["expert_count"][layer, s] / ref["expert_count"][layer, s].sum())
            np.testing.assert_allclose(experts["activation_rate"][source], ref["expert_count"][layer, s] / (n * M))


def test_specialisation_follows_its_formula(report, ref):
    n = sum(ref["tokens"].values())
    for layer, entry in enumerate(report["by_source"]["layers"]):
        for kind, counts in (("heads", ref["head_count"][layer]), ("experts", ref["expert_count"][layer])):
            for s, source in enumerate(SOURCES):
                for node, score in enumerate(entry[kind]["specialisation"][source]):
                    # (node's share of its traffic that comes from s) / (s's share of all tokens)
                    expected = (counts[s, node] / counts[:, node].sum()) / (ref["tokens"][source] / n)
                    assert score == pytest.approx(expected, rel=1e-9), (layer, kind, source, node)
        # shared heads are always on: no preference for any source
        assert all(entry["heads"]["specialisation"][source][0] == pytest.approx(1.0) for source in SOURCES)


def test_cross_layer_cooccurrence_equals_an_independent_count_and_rows_sum_to_the_load(report, ref):
    pairs = report["cross_layer"]
    assert [pair["layers"] for pair in pairs] == [[0, 1], [1, 2]]
    for layer, pair in enumerate(pairs):
        np.testing.assert_allclose(pair["heads"]["cooccurrence"], ref["head_pairs"][layer], rtol=1e-9)
        np.testing.assert_allclose(pair["experts"]["cooccurrence"], ref["expert_pairs"][layer], rtol=1e-9)
        this = report["layers"][layer]
        np.testing.assert_allclose(np.sum(pair["heads"]["cooccurrence"], 1), this["heads"]["activation_count"])
        np.testing.assert_allclose(np.sum(pair["experts"]["cooccurrence"], 1), this["experts"]["assignment_count"])
        np.testing.assert_allclose(np.sum(pair["experts"]["transition"], 1), 1.0)
        for name in ("top_successor_share", "top_successor_share_if_independent", "uncertainty_coefficient"):
            assert 0.0 <= pair["experts"][name] <= 1.0


def test_consistency_is_one_when_the_next_expert_is_determined_and_low_when_independent():
    cfg = GoHConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=2, router="dense", ffn="moe", n_experts=4,
                    top_k_experts=1)
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, 4, (64, 8, 1, 1), generator=g)

    def record(indices):
        return LayerRouting(head_gates=torch.ones(64, 8, 2), experts=ExpertRouting(expert_indices=indices))

    stats = RoutingStats(cfg)
    stats.update([record(first), record((first + 1) % 4)])  # expert i is always followed by i + 1
    pair = stats.report()["cross_layer"][0]["experts"]
    assert pair["top_successor_share"] == pytest.approx(1.0)
    assert pair["uncertainty_coefficient"] == pytest.approx(1.0)
    assert pair["top_successor_share_if_independent"] == pytest.approx(0.25, abs=0.05)
    counts = np.zeros((4, 4))
    for i in first.flatten().tolist():
        counts[i, (i + 1) % 4] += 1
    np.testing.assert_allclose(pair["cooccurrence"], counts)

    stats = RoutingStats(cfg)
    stats.update([record(first), record(torch.randint(0, 4, (64, 8, 1, 1), generator=g))])
    pair = stats.report()["cross_layer"][0]["experts"]
    assert pair["uncertainty_coefficient"] < 0.05
    assert pair["top_successor_share"] < 0.4


def test_token_entropy_per_token_id_equals_an_independent_count(report, ref):
    for layer, entry in enumerate(report["layers"]):
        entropy = entry["token_entropy"]
        seen = [v for v in range(CFG.vocab_size) if ref["occurrences"][v] > 0]
        assert entropy["token_id"] == seen
        assert entropy["occurrences"] == [int(ref["occurrences"][v]) for v in seen]
        for key, counts in (("head_entropy", ref["token_heads"][layer]), ("expert_entropy", ref["token_experts"][layer])):
            for v, value in zip(seen, entropy[key]):
                p = counts[v] / counts[v].sum()
                assert value == pytest.approx(-sum(x * math.log(x) for x in p if x > 0), abs=1e-12)
        assert entropy["expert_entropy_max"] == pytest.approx(math.log(E))


def test_padding_never_counts(batches, report):
    """The padded batches give exactly the report of their real tokens laid out without padding."""
    stats = RoutingStats(CFG, sources=SOURCES)
    for records, ids, mask, sources in batches:
        for b in range(ids.shape[0]):
            real = mask[b]
            row = [LayerRouting(head_gates=r.head_gates[b, real][None], experts=ExpertRouting(
                expert_indices=r.expert_indices[b, real][None], expert_weights=r.expert_weights[b, real][None]))
                for r in records]
            stats.update(row, ids[b, real][None], source=sources[b])
    unpadded = stats.report()
    assert_same(report, unpadded)
    # and the padding's routing (head 1, experts 0 and 1 with gate 50) would have shown
    assert max(report["layers"][0]["heads"]["gate_mass"]) < 50 * report["tokens"]


def test_load_percentiles_across_layers(report):
    pooled = np.concatenate([layer["experts"]["assignment_count"] for layer in report["layers"]])
    across = report["summary"]["load_percentiles"]["experts"]["assignment_count"]["across_layers"]
    for name, q in (("min", 0), ("p5", 5), ("p25", 25), ("p50", 50), ("p75", 75), ("p95", 95), ("max", 100)):
        assert across[name] == pytest.approx(np.percentile(pooled, q))
    per_layer = report["summary"]["load_percentiles"]["experts"]["utilisation"]["per_layer"]
    assert [entry["layer"] for entry in per_layer] == [0, 1, 2]
    assert per_layer[1]["p50"] == pytest.approx(np.median(report["layers"][1]["experts"]["utilisation"]))
    heads = report["summary"]["load_percentiles"]["heads"]["activation_count"]["per_layer"][2]
    assert heads["max"] == max(report["layers"][2]["heads"]["activation_count"][HS:])


def test_csv_holds_the_new_sections(batches, tmp_path):
    stats = RoutingStats(CFG, sources=SOURCES)
    for records, ids, mask, sources in batches:
        stats.update(records, ids, attention_mask=mask, source=sources)
    with stats.to_csv(tmp_path / "stats.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    groups = {row["group"] for row in rows}
    assert {"source", "source_head", "source_expert", "cross_layer_heads", "cross_layer_experts",
            "load_percentile", "token"} <= groups
    report = stats.report()
    spec = next(row for row in rows if row["group"] == "source_expert" and row["item"] == "prose:3"
                and row["metric"] == "specialisation" and row["layer"] == "1")
    assert float(spec["value"]) == pytest.approx(report["by_source"]["layers"][1]["experts"]["specialisation"]["prose"][3])


def test_update_arguments_are_checked(batches):
    records, ids, mask, sources = batches[0]
    stats = RoutingStats(CFG, sources=SOURCES)
    with pytest.raises(ValueError, match="pass source="):
        stats.update(records, ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"\['web'\] are not among"):
        stats.update(records, ids, attention_mask=mask, source="web")
    with pytest.raises(ValueError, match="attention_mask has shape"):
        stats.update(records, ids, attention_mask=mask[:, 1:], source=sources)
    with pytest.raises(ValueError, match="only 0"):
        stats.update(records, ids, attention_mask=mask.long() * 2, source=sources)
    with pytest.raises(ValueError, match="source= needs"):
        RoutingStats(CFG).update(records, ids, source="code")
    assert stats.batches == 0


def test_a_real_model_on_padded_batches_counts_only_real_tokens():
    """Left-padded batches through the model (positions from the mask) = each row alone, unpadded."""
    cfg = GoHConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2,
                    router="graph", router_rounds=1, ffn="moe", n_experts=4, top_k_experts=2)
    torch.manual_seed(0)
    model = GoHTransformer(cfg)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 32, (n,), generator=g) for n in (9, 5, 7)]
    seq = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), seq, dtype=torch.long)
    mask = torch.zeros(len(rows), seq, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, seq - len(row):], mask[b, seq - len(row):] = row, 1
    padded = collect_routing_stats_by_source(model, {"a": [(ids[:2], mask[:2])], "b": [(ids[2:], mask[2:])]},
                                             progress=False).report()
    alone = collect_routing_stats_by_source(model, {"a": [row[None] for row in rows[:2]], "b": [rows[2][None]]},
                                            progress=False).report()
    assert padded["tokens"] == sum(len(r) for r in rows)
    assert_same(padded, alone, rel=1e-5)
    assert routing_by_source(model, {"a": [rows[0][None]]})["tokens"] == {"a": 9}
    plain = collect_routing_stats(model, [(ids, mask)], progress=False).report()
    assert plain["layers"][1]["experts"]["assignment_count"] == padded["layers"][1]["experts"]["assignment_count"]


def assert_same(a, b, rel=1e-9, path="report"):
    if isinstance(a, dict):
        assert set(a) - {"batches"} == set(b) - {"batches"}, path
        for key in a:
            if key != "batches":
                assert_same(a[key], b[key], rel, f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, rel, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-9), path
    else:
        assert a == b, path
