"""Within-layer co-activation P(b | a) and vocabulary specialisation on one routing record made by hand.

One layer, six positions of which the first is padding (never counted). Heads: 0 shared, 1-3
routed, two per token; experts: 3 routed, two sub-tokens per token, top-2 each. The expected
numbers below are counted by hand from the sets in the comments.
"""

import csv

import numpy as np
import pytest
import torch

from gohgraph import ExpertRouting, GoHConfig, LayerRouting
from gohgraph.analysis.stats.coactivation import conditional_coactivation
from gohgraph.analysis.stats.collect import RoutingStats
from gohgraph.analysis.stats.vocabulary import vocabulary_section

CFG = GoHConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=4, n_shared_heads=1, top_k_heads=2, router="linear",
                ffn="mh-moe", n_experts=4, n_shared_experts=1, n_subtokens=2, top_k_experts=2)
HEAD_SETS = [{0, 1, 2}, {0, 1, 2}, {0, 1, 3}, {0, 1, 2}, {0, 2, 3}, {0, 1, 2}]  # position 0 is padding
EXPERT_CHOICES = [[[0, 1], [0, 1]], [[0, 1], [1, 2]], [[0, 2], [0, 1]], [[0, 1], [0, 1]], [[1, 2], [0, 2]],
                  [[2, 0], [1, 0]]]  # [position][sub-token] -> its two routed experts
INPUT_IDS = torch.tensor([[7, 3, 5, 3, 6, 3]])
PREDICTED_IDS = torch.tensor([[0, 5, 3, 5, 5, 1]])
MASK = torch.tensor([[0, 1, 1, 1, 1, 1]])


def record():
    gates = torch.zeros(1, 6, 4)
    for t, heads in enumerate(HEAD_SETS):
        gates[0, t, sorted(heads)] = 0.5
    indices = torch.tensor([EXPERT_CHOICES])
    return LayerRouting(head_gates=gates, experts=ExpertRouting(expert_indices=indices,
                                                                expert_weights=torch.full(indices.shape, 0.5)))


@pytest.fixture(scope="module")
def report():
    stats = RoutingStats(CFG, min_occurrences=1)
    stats.update([record()], INPUT_IDS, attention_mask=MASK, predicted_ids=PREDICTED_IDS)
    return stats.report()


def test_head_coactivation_given_is_the_hand_count(report):
    # real tokens: heads {1,2} x3 (positions 1, 3, 5), {1,3}, {2,3}; head 0 always
    given = report["layers"][0]["heads"]["coactivation_given"]
    expected = [[1, 4 / 5, 4 / 5, 2 / 5],
                [1, 1, 3 / 4, 1 / 4],  # head 1 active 4 times: with 2 three times, with 3 once
                [1, 3 / 4, 1, 1 / 4],
                [1, 1 / 2, 1 / 2, 1]]
    np.testing.assert_allclose(given, expected, rtol=1e-12)


def test_expert_coactivation_given_counts_sub_token_decisions(report):
    # ten decisions: {0,1} x5, {1,2} x2, {0,2} x3 -> e0 chosen 8 times, e1 7, e2 5
    experts = report["layers"][0]["experts"]
    np.testing.assert_allclose(experts["coactivation_given"], [[1, 5 / 8, 3 / 8], [5 / 7, 1, 2 / 7], [3 / 5, 2 / 5, 1]],
                               rtol=1e-12)
    assert experts["coactivation"][0][1] == pytest.approx(5 / 10)  # P(a and b) per decision


def test_a_unit_never_chosen_has_an_undefined_row():
    joint = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    assert conditional_coactivation(joint) == [[1.0, 0.5, 0.0], [1 / 3, 1.0, 0.0], [None, None, None]]
    with pytest.raises(ValueError, match="square"):
        conditional_coactivation(torch.zeros(2, 3))


def test_vocabulary_by_input_token_is_the_hand_count(report):
    layer = report["vocabulary"]["layers"][0]
    heads, experts = layer["heads"]["input"], layer["experts"]["input"]
    assert heads["units"] == [1, 2, 3] and experts["units"] == [0, 1, 2]
    # token 3 at positions 1, 3, 5 -> heads {1,2} every time (tie: the lowest id), token 5 -> {1,3}, 6 -> {2,3};
    # the padding's token 7 never counts
    assert heads["by_token"] == {"token_id": [3, 5, 6], "occurrences": [3, 1, 1], "top_unit": [1, 1, 2],
                                 "top_share": [1.0, 1.0, 1.0]}
    # token 3's six sub-token decisions: e0 5 times, e1 5 (tie -> e0), e2 twice
    assert experts["by_token"]["top_unit"] == [0, 0, 2]
    assert experts["by_token"]["top_share"] == pytest.approx([5 / 6, 1.0, 1.0])
    assert heads["top_tokens"] == [[[3, 1.0, 3], [5, 1.0, 1]],  # equal shares: the more frequent token first
                                   [[3, 1.0, 3], [6, 1.0, 1]],
                                   [[5, 1.0, 1], [6, 1.0, 1]]]  # then the lower id
    np.testing.assert_allclose(experts["top_tokens"][0], [[5, 1.0, 1], [3, 5 / 6, 3], [6, 0.5, 1]], rtol=1e-12)
    np.testing.assert_allclose(experts["top_tokens"][2], [[6, 1.0, 1], [5, 0.5, 1], [3, 1 / 3, 3]], rtol=1e-12)


def test_vocabulary_by_predicted_token_is_the_hand_count(report):
    layer = report["vocabulary"]["layers"][0]
    # predictions at the real positions: 5, 3, 5, 5, 1; 5 at positions 1, 3, 4
    heads, experts = layer["heads"]["predicted"], layer["experts"]["predicted"]
    assert heads["by_token"] == {"token_id": [1, 3, 5], "occurrences": [1, 1, 3], "top_unit": [1, 1, 2],
                                 "top_share": [1.0, 1.0, 1.0]}
    # token 5's decisions {0,1} {1,2} {0,1} {0,1} {1,2} {0,2}: e1 five of six
    assert experts["by_token"]["top_unit"][2] == 1
    assert experts["by_token"]["top_share"][2] == pytest.approx(5 / 6)


def test_min_occurrences_keeps_rare_tokens_out_of_top_tokens():
    counts = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.0, 1.0]])
    section = vocabulary_section(counts, torch.tensor([0.0, 3.0, 1.0]), min_occurrences=2)
    assert section["top_tokens"] == [[[1, 1.0, 3]], []]
    assert section["by_token"]["token_id"] == [1, 2]  # by_token lists every token seen
    with pytest.raises(ValueError, match="min_occurrences"):
        vocabulary_section(counts, torch.tensor([0.0, 3.0, 1.0]), min_occurrences=0)
    with pytest.raises(ValueError, match="min_occurrences"):
        RoutingStats(CFG, min_occurrences=True)


def test_predicted_ids_are_checked_and_written_to_csv(tmp_path):
    stats = RoutingStats(CFG, min_occurrences=3)  # tokens seen three times enter top_tokens
    with pytest.raises(ValueError, match="predicted_ids must lie in"):
        stats.update([record()], INPUT_IDS, predicted_ids=PREDICTED_IDS + 8)
    with pytest.raises(ValueError, match="predicted_ids needs input_ids"):
        stats.update([record()], predicted_ids=PREDICTED_IDS)
    stats.update([record()], INPUT_IDS, attention_mask=MASK, predicted_ids=PREDICTED_IDS)
    with pytest.raises(ValueError, match="to every update"):
        stats.update([record()], INPUT_IDS)
    rows = list(csv.DictReader(stats.to_csv(tmp_path / "s.csv").open()))
    assert {"layer": "0", "group": "vocab_experts_input", "item": "3", "metric": "top_share",
            "value": str(5 / 6)} in rows
    assert {"layer": "0", "group": "expert_pair", "item": "0&1", "metric": "coactivation_given",
            "value": str(5 / 8)} in rows
    assert {"layer": "0", "group": "vocab_heads_predicted_unit", "item": "2#0", "metric": "token_id",
            "value": "5"} in rows
    # of the input tokens only 3 is seen three times
    assert {row["value"] for row in rows if row["group"] == "vocab_heads_input_unit" and row["metric"] == "token_id"} \
        == {"3"}


def test_tables_by_prediction_are_left_out_where_they_would_pass_the_memory_bound():
    # one layer, 4 heads: input tables fit up to 2**22 / 4 token ids, prediction tables (twice) up to half that
    cfg = GoHConfig(vocab_size=600_000, d_model=16, n_layers=1, n_heads=4, n_shared_heads=1, top_k_heads=2,
                    router="linear")
    stats = RoutingStats(cfg, min_occurrences=1)
    gates = torch.zeros(1, 6, 4)
    for t, heads in enumerate(HEAD_SETS):
        gates[0, t, sorted(heads)] = 0.5
    stats.update([LayerRouting(head_gates=gates)], INPUT_IDS, predicted_ids=PREDICTED_IDS)
    layer = stats.report()["vocabulary"]["layers"][0]
    assert list(layer["heads"]) == ["input"]
    assert layer["heads"]["input"]["by_token"]["token_id"] == [3, 5, 6, 7]
