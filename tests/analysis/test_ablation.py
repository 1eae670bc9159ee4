"""Knock-outs, k-ablation and message ablation (gohgraph.analysis.ablation) against references built
by hand: hooks that zero a head's gate or an expert's logit, the dense blend, a model built without
a head graph."""

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.analysis.ablation import (
    EXPERT_K,
    EXPERT_OFF,
    HEAD_K,
    HEAD_OFF,
    HEAD_ON,
    MESSAGES,
    ablate,
    ablated_k_values,
    changed_share,
    check_ablatable,
    evaluate_routing,
    experts_forced_off,
    heads_forced,
    messages_ablated,
    routed_top_k,
)

TINY = dict(vocab_size=64, d_model=48, n_layers=2, n_heads=6, n_shared_heads=1, top_k_heads=3, router="graph",
            router_rounds=2, router_dim=8, max_seq_len=32)
MOE = dict(ffn="moe", n_experts=4, top_k_experts=2)


def tiny_model(seed=0, **overrides):
    """A tiny GoH decoder whose router logits, flow scales and stage weights are far from their init,
    so every gate, flow weight and selection matters."""
    torch.manual_seed(seed)
    model = GoHTransformer(GoHConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for block in model.blocks:
            routing = block.attn.head_routing
            if routing.router.__class__.__name__ == "HeadRouter":
                routing.router.score.weight.normal_(std=1.0)
            if routing.flow_scale is not None:
                routing.flow_scale.normal_(std=1.0)
    return model


def batches(seed=1, n=2):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["vocab_size"], (2, 12), generator=generator) for _ in range(n)]


def loss_of(model, data):
    return evaluate_routing(model, data).loss


# ---------------------------------------------------------------------- heads forced off / on
def zero_head_by_hand(head):
    """A forward hook on HeadRouting: head ``head``'s gate 0 and its row and column of the mixing
    matrix 0 (it outputs nothing, and sends and receives no flow)."""
    def hook(module, inputs, output):
        gates, mixing, record = output
        gates = gates.clone()
        gates[..., head] = 0.0
        if mixing is not None:
            mixing = mixing.clone()
            mixing[..., head, :] = 0.0
            mixing[..., :, head] = 0.0
        return gates, mixing, record
    return hook


@pytest.mark.parametrize("inter_head_flow", [True, False])
@pytest.mark.parametrize("layer,head", [(0, 0), (1, 4)])  # a shared head, a routed one
def test_a_head_forced_off_equals_its_gate_zeroed_by_hand(inter_head_flow, layer, head):
    model, data = tiny_model(inter_head_flow=inter_head_flow), batches()
    with heads_forced(model, layer, off=[head]):
        ablated = [model(batch).logits for batch in data]
    handle = model.blocks[layer].attn.head_routing.register_forward_hook(zero_head_by_hand(head))
    try:
        by_hand = [model(batch).logits for batch in data]
    finally:
        handle.remove()
    baseline = [model(batch).logits for batch in data]
    for a, b, base in zip(ablated, by_hand, baseline):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(a, base)  # the head mattered, so the comparison says something


def test_every_head_forced_on_equals_the_dense_blend_at_one():
    model, data = tiny_model(), batches()
    heads = range(TINY["n_heads"])
    with heads_forced(model, 0, on=heads), heads_forced(model, 1, on=heads):
        forced = [model(batch).logits for batch in data]
    model.set_dense_blend(1.0)
    dense = [model(batch).logits for batch in data]
    for a, b in zip(forced, dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_head_forced_on_is_selected_with_gate_one_for_every_token():
    model, data = tiny_model(), batches()
    with heads_forced(model, 1, on=[5]):
        gates = model(data[0]).routing[1].head_gates
    assert torch.equal(gates[..., 5], torch.ones_like(gates[..., 5]))


def test_the_interventions_are_undone_on_exit_also_after_an_error():
    model = tiny_model(**MOE)
    with pytest.raises(RuntimeError):
        with heads_forced(model, 0, off=[1]), experts_forced_off(model, 1, [2]), routed_top_k(model, 1, 1), \
                messages_ablated(model, "empty-graph"):
            raise RuntimeError("inside")
    for block in model.blocks:
        routing = block.attn.head_routing
        assert routing.gate.forced_off is None and routing.gate.forced_on is None
        assert routing.gate.top_k == 3 and routing.router.message_ablation is None
        assert block.ffn.gate.forced_off is None and block.ffn.top_k == block.ffn.gate.top_k == 2


# ---------------------------------------------------------------------- experts
def test_an_expert_forced_off_equals_its_logit_at_minus_infinity_by_hand():
    model, data = tiny_model(**MOE), batches()
    with experts_forced_off(model, 0, [1]):
        ablated = [model(batch) for batch in data]
    handle = model.blocks[0].ffn.router.register_forward_hook(
        lambda module, inputs, logits: logits.index_fill(-1, torch.tensor([1]), float("-inf")))
    try:
        by_hand = [model(batch).logits for batch in data]
    finally:
        handle.remove()
    for out, reference in zip(ablated, by_hand):
        torch.testing.assert_close(out.logits, reference, rtol=1e-5, atol=1e-6)
        assert not (out.routing[0].expert_indices == 1).any()  # its sub-tokens went to their next choice
        assert out.routing[0].expert_indices.shape[-1] == 2


# ---------------------------------------------------------------------- k-ablation
def test_k_ablation_at_the_trained_k_changes_nothing():
    model, data = tiny_model(**MOE), batches()
    baseline = evaluate_routing(model, data)
    with routed_top_k(model, heads=3, experts=2):
        same = evaluate_routing(model, data)
    assert same.loss == baseline.loss
    assert changed_share(baseline.head_sets, same.head_sets) == 0.0
    assert changed_share(baseline.expert_sets, same.expert_sets) == 0.0


def test_k_ablation_selects_k_heads_per_token():
    model, data = tiny_model(**MOE), batches()
    with routed_top_k(model, heads=1, experts=1):
        out = model(data[0])
    for record in out.routing:
        assert torch.equal((record.head_gates[..., 1:] != 0).sum(-1), torch.ones(2, 12, dtype=torch.long))
        assert record.expert_indices.shape[-1] == 1


def test_ablated_k_values():
    assert ablated_k_values(4) == [3, 2, 1]
    assert ablated_k_values(3) == [2, 1]
    assert ablated_k_values(2) == [1]
    assert ablated_k_values(1) == []


# ---------------------------------------------------------------------- message ablation
def test_message_ablation_of_a_model_without_graph_edges_changes_nothing():
    model, data = tiny_model(head_graph="none"), batches()
    report = ablate(model, data)
    rows = [row for row in report.rows if row.kind == MESSAGES]
    assert [row.unit for row in rows] == ["no-messages", "empty-graph"]
    for row in rows:
        assert row.delta_loss == 0.0 and row.changed_decisions == 0.0


def test_the_empty_graph_ablation_equals_the_model_built_without_edges():
    model, data = tiny_model(head_graph="complete"), batches()
    torch.manual_seed(0)
    without_edges = GoHTransformer(GoHConfig(**{**TINY, "head_graph": "none"})).eval()
    state = {name: value for name, value in model.state_dict().items() if not name.endswith("flow_scale")}
    without_edges.load_state_dict(state)
    with messages_ablated(model, "empty-graph"):
        ablated = [model(batch).logits for batch in data]
    with messages_ablated(model, "no-messages"):
        no_messages = [model(batch).logits for batch in data]
    for a, b, c in zip(ablated, no_messages, [without_edges(batch).logits for batch in data]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(b, c)  # no-messages keeps the flow, which the flow scales make count


def test_message_ablation_needs_a_graph_router():
    with pytest.raises(ValueError, match="router='graph'"):
        with messages_ablated(tiny_model(router="linear"), "no-messages"):
            pass


# ---------------------------------------------------------------------- the whole run
def test_ablate_reports_every_intervention_with_deltas_from_the_baseline():
    model, data = tiny_model(**MOE), batches()
    report = ablate(model, data)
    kinds = [row.kind for row in report.rows]
    assert kinds.count(HEAD_OFF) == 2 * 6 and kinds.count(HEAD_ON) == 2 * 5  # shared head 0 is always on
    assert kinds.count(EXPERT_OFF) == 2 * 4
    assert [row.unit for row in report.rows if row.kind == HEAD_K] == ["k=2", "k=1"]
    assert [row.unit for row in report.rows if row.kind == EXPERT_K] == ["k=1"]
    assert report.baseline_loss == pytest.approx(loss_of(model, data))
    with heads_forced(model, 1, off=[3]):
        expected = loss_of(model, data) - report.baseline_loss
    row = next(r for r in report.rows if (r.kind, r.layer, r.unit) == (HEAD_OFF, 1, "3"))
    assert row.delta_loss == pytest.approx(expected, abs=1e-7)
    matrix = report.head_matrix(HEAD_ON)
    assert matrix.shape == (2, 6) and torch.isnan(matrix[:, 0]).all() and not torch.isnan(matrix[:, 1:]).any()
    assert all(r.changed_decisions is not None and 0.0 <= r.changed_decisions <= 1.0 for r in report.rows)


def test_changed_share_counts_rows_whose_set_differs():
    base = [torch.tensor([[1, 0], [0, 1]], dtype=torch.bool), None]
    new = [torch.tensor([[1, 0], [1, 0]], dtype=torch.bool), None]
    assert changed_share(base, new) == 0.5
    assert changed_share([None], [None]) is None


def test_a_model_with_nothing_routed_is_refused_in_one_line():
    with pytest.raises(ValueError, match="ablate needs routed heads"):
        check_ablatable(GoHTransformer(GoHConfig(**{**TINY, "router": "dense"})))


def test_a_model_of_another_family_is_refused_in_one_line():
    from gohgraph.models.encoder import GoHEncoder

    encoder = GoHEncoder(GoHConfig(**{**TINY, "model_type": "encoder", "position_embedding": "sinusoidal"}))
    with pytest.raises(ValueError, match="ablate needs a decoder"):
        check_ablatable(encoder)
