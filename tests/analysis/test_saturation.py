"""Router saturation (gohgraph.analysis.saturation): 1 against itself, hand counts for a changed router."""

import copy

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.analysis.saturation import routing_saturation, saturation_share

CFG = GoHConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2, router="linear",
                ffn="mh-moe", n_experts=5, n_shared_experts=1, n_subtokens=2, top_k_experts=2, max_seq_len=32)


@pytest.fixture(scope="module")
def final_and_batches():
    torch.manual_seed(0)
    final = GoHTransformer(CFG).eval()
    g = torch.Generator().manual_seed(1)
    return final, [torch.randint(0, 64, (2, 12), generator=g) for _ in range(2)]


def swapped_rows(model, module_path, a, b):
    """A copy of ``model`` whose router weight at ``module_path`` has rows ``a`` and ``b`` exchanged:
    the router then scores unit ``a`` as it scored ``b`` and back, so every choice of one is the other."""
    changed = copy.deepcopy(model)
    weight = changed.get_submodule(module_path).weight
    with torch.no_grad():
        weight[[a, b]] = weight[[b, a]].clone()
    return changed


def final_sets(model, batches, layer):
    """The final model's routed head sets and expert sets of ``layer``, read from its routing records."""
    heads, experts = [], []
    with torch.no_grad():
        for batch in batches:
            record = model(batch).routing[layer]
            for gates in record.head_gates.reshape(-1, 4):
                heads.append({h for h in range(1, 4) if gates[h] != 0})
            experts += [set(row.tolist()) for row in record.expert_indices.reshape(-1, 2)]
    return heads, experts


def test_the_final_checkpoint_against_itself_is_exactly_one(final_and_batches):
    final, batches = final_and_batches
    report = routing_saturation([(100, final)], final, batches)
    assert report["tokens"] == 2 * 2 * 12
    (entry,) = report["checkpoints"]
    assert entry["step"] == 100 and entry["heads"] == 1.0 and entry["experts"] == 1.0
    assert entry["layers"] == [{"layer": 0, "heads": 1.0, "experts": 1.0}, {"layer": 1, "heads": 1.0, "experts": 1.0}]


def test_a_head_router_with_two_heads_swapped_gives_the_hand_counted_share(final_and_batches):
    final, batches = final_and_batches
    # the last layer's head router scores heads 1 and 2 the other way round: a token keeps its choice
    # where it chose both or neither, and loses one of its two where it chose exactly one of them
    checkpoint = swapped_rows(final, "blocks.1.attn.head_routing.router.proj", 1, 2)
    heads, _ = final_sets(final, batches, layer=1)
    one_of_them = sum(len(chosen & {1, 2}) == 1 for chosen in heads)
    expected = 1 - one_of_them / (2 * len(heads))
    assert 0 < one_of_them < len(heads)  # the case is not trivial
    entry = routing_saturation([(10, checkpoint), (20, final)], final, batches)["checkpoints"][0]
    assert entry["layers"][1]["heads"] == pytest.approx(expected, abs=1e-12)
    assert entry["layers"][0] == {"layer": 0, "heads": 1.0, "experts": 1.0}  # layer 0 is unchanged


def test_an_expert_router_with_two_experts_swapped_gives_the_hand_counted_share(final_and_batches):
    final, batches = final_and_batches
    checkpoint = swapped_rows(final, "blocks.1.ffn.router.proj", 0, 3)
    _, experts = final_sets(final, batches, layer=1)
    one_of_them = sum(len(chosen & {0, 3}) == 1 for chosen in experts)
    assert 0 < one_of_them < len(experts)
    entry = routing_saturation([(10, checkpoint)], final, batches)["checkpoints"][0]
    assert entry["layers"][1]["experts"] == pytest.approx(1 - one_of_them / (2 * len(experts)), abs=1e-12)
    assert entry["layers"][1]["heads"] == 1.0 and entry["layers"][0]["experts"] == 1.0
    assert entry["experts"] == pytest.approx((1.0 + entry["layers"][1]["experts"]) / 2)


def test_bad_input_is_refused_with_one_line(final_and_batches):
    final, batches = final_and_batches
    with pytest.raises(ValueError, match="at least one validation batch"):
        routing_saturation([(1, final)], final, [])
    with pytest.raises(ValueError, match="step '5' must be an int"):
        routing_saturation([("5", final)], final, batches)
    with pytest.raises(ValueError, match="same decisions"):
        saturation_share(torch.zeros(3, 2, dtype=torch.bool), torch.zeros(4, 2, dtype=torch.bool))
    dense = GoHTransformer(GoHConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, router="dense"))
    with pytest.raises(ValueError, match="nothing is routed"):
        routing_saturation([(1, dense)], dense, batches)
