"""Padding never routes (docs/decoder.md): a padded batch routes its real tokens exactly as the same
tokens without the padding do.

The references are independent of the masking code: the batch with its padding positions cut out
(same rows, same order), or each row run alone. Compared: real-token outputs, every routing loss,
capacity drops (``capacity_factor=1.0``), load counts and the auxiliary-loss-free bias / running
load after ``update_routing_biases``, for decoders (left padding), encoders and seq2seq (right
padding), every expert FFN kind and the linear and graph head routers.
"""

import copy

import pytest
import torch

from gohgraph import GoHConfig, GoHEncoder, GoHSeq2Seq, GoHTransformer
from gohgraph.moe.layer import MoEFeedForward
from gohgraph.routers.heads import HeadRouting
from gohgraph.routers.losses import BalancedRouting, load_balance_loss, router_z_loss
from gohgraph.routers.recursion import ExpertChoiceRecursionRouter

VOCAB = 64
FFNS = ("moe", "mh-moe", "graph-moe")
ROUTERS = ("linear", "graph")


def config(router="graph", ffn="moe", **changes):
    values = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2,
                  router=router, router_rounds=1, router_dim=8, max_seq_len=32, ffn=ffn, n_experts=4,
                  top_k_experts=2, expert_hidden=16, capacity_factor=1.0, aux_free_bias=True,
                  bias_update_rate=0.01)
    if ffn != "moe":
        values["n_subtokens"] = 2
    values.update(changes)
    return GoHConfig(**values)


def sharpen(model, scale=30.0):
    """Separate the routers' logits so a 1e-7 difference between attention kernels never flips a
    choice, and skew them so capacity 1.0 drops assignments."""
    torch.manual_seed(123)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("router.proj.weight", "router.query.weight", "router.score.weight")):
                param.mul_(scale)
            if name.endswith("router.expert_bias"):
                param.copy_(torch.linspace(1.0, -1.0, param.numel()))
    return model


def balancing_state(model):
    """Every balanced router's load counts, selection bias and running load, by module name."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, BalancedRouting):
            state[name + ".load_since_update"] = module.load_since_update.clone()
            state[name + ".selection_bias"] = module.selection_bias.clone()
            if hasattr(module, "expert_load"):
                state[name + ".expert_load"] = module.expert_load.clone()
    return state


def assert_same_balancing(padded, reference):
    before = balancing_state(padded)
    assert any(v.abs().sum() > 0 for k, v in before.items() if k.endswith("load_since_update"))
    torch.testing.assert_close(before, balancing_state(reference), rtol=0, atol=0)
    padded.update_routing_biases()
    reference.update_routing_biases()
    torch.testing.assert_close(balancing_state(padded), balancing_state(reference), rtol=0, atol=1e-7)


def expert_drops(routing, keep=None):
    """``[layers, tokens, subtokens, k]`` drops of the real tokens (``keep [batch, seq]`` bool)."""
    drops = [r.expert_drops for r in routing if r.experts is not None]
    return torch.stack([d[keep] if keep is not None else d.flatten(0, 1) for d in drops])


# ----------------------------------------------------------------------- the losses themselves
def test_masked_balance_and_z_loss_equal_those_of_the_valid_rows_alone():
    torch.manual_seed(0)
    logits = torch.randn(9, 5)
    selected = logits.topk(2, dim=-1).indices
    valid = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(load_balance_loss(probs, selected, 5, valid),
                               load_balance_loss(probs[valid], selected[valid], 5), rtol=0, atol=1e-7)
    torch.testing.assert_close(router_z_loss(logits, valid), router_z_loss(logits[valid]), rtol=0, atol=1e-7)
    # padding whose logits are garbage changes nothing
    logits[~valid] = 1e4
    torch.testing.assert_close(router_z_loss(logits, valid), router_z_loss(logits[valid]), rtol=0, atol=1e-7)


def test_all_padding_gives_zero_losses_not_nan():
    logits = torch.randn(4, 3)
    none = torch.zeros(4, dtype=torch.bool)
    assert router_z_loss(logits, none).item() == 0.0
    assert load_balance_loss(torch.softmax(logits, -1), logits.topk(1).indices, 3, none).item() == 0.0


# ----------------------------------------------------------------------- one layer against the cut-out batch
# rows with padding on either side and a row without any
TOKEN_MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1],
                           [1, 1, 1, 1, 1, 1, 1],
                           [1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("ffn", FFNS)
def test_moe_layer_routes_padding_nowhere_that_counts(ffn):
    cfg = config(ffn=ffn, n_shared_experts=1)
    torch.manual_seed(0)
    layer = sharpen(MoEFeedForward(cfg)).train()
    reference = copy.deepcopy(layer)
    x = torch.randn(*TOKEN_MASK.shape, cfg.d_model)
    x[~TOKEN_MASK] = 50.0 * torch.randn(int((~TOKEN_MASK).sum()), cfg.d_model)  # loud padding

    y, routing = layer(x, TOKEN_MASK)
    y_ref, routing_ref = reference(x[TOKEN_MASK].unsqueeze(0))  # the batch without its padding positions

    torch.testing.assert_close(y[TOKEN_MASK], y_ref[0], rtol=0, atol=1e-6)
    assert routing.aux_losses.keys() == routing_ref.aux_losses.keys() == {"expert_balance", "expert_z"}
    for name, value in routing.aux_losses.items():
        torch.testing.assert_close(value, routing_ref.aux_losses[name], rtol=0, atol=1e-6)
    assert routing_ref.expert_drops.any(), "capacity 1.0 should drop something here"
    assert torch.equal(routing.expert_drops[TOKEN_MASK], routing_ref.expert_drops[0])
    assert not routing.expert_drops[~TOKEN_MASK].any() and not routing.dropped[~TOKEN_MASK].any()
    torch.testing.assert_close(layer.gate.load_since_update, reference.gate.load_since_update, rtol=0, atol=0)
    layer.gate.update_bias()
    reference.gate.update_bias()
    torch.testing.assert_close(layer.gate.selection_bias, reference.gate.selection_bias, rtol=0, atol=0)
    torch.testing.assert_close(layer.gate.expert_load, reference.gate.expert_load, rtol=0, atol=1e-7)


def test_moe_layer_without_real_tokens_computes_nothing_and_stays_finite():
    layer = MoEFeedForward(config(ffn="mh-moe")).train()
    y, routing = layer(torch.randn(2, 3, 32), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(y, torch.zeros_like(y))
    assert all(torch.isfinite(v) for v in routing.aux_losses.values())
    assert layer.gate.load_since_update.sum() == 0


@pytest.mark.parametrize("router", ROUTERS)
def test_head_routing_counts_only_real_tokens(router):
    cfg = config(router=router)
    torch.manual_seed(0)
    routing = HeadRouting(cfg).train()
    reference = copy.deepcopy(routing)
    x = torch.randn(*TOKEN_MASK.shape, cfg.d_model)
    q = torch.randn(*TOKEN_MASK.shape, cfg.n_heads, cfg.head_dim)
    gates, _, record = routing(x, q, TOKEN_MASK)
    gates_ref, _, record_ref = reference(x[TOKEN_MASK][None], q[TOKEN_MASK][None])
    torch.testing.assert_close(gates[TOKEN_MASK], gates_ref[0], rtol=0, atol=0)
    assert record.head_losses.keys() == {"head_balance", "head_z"}
    for name, value in record.head_losses.items():
        torch.testing.assert_close(value, record_ref.head_losses[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(routing.gate.load_since_update, reference.gate.load_since_update, rtol=0, atol=0)


def test_z_loss_is_not_computed_when_its_weight_is_zero():
    cfg = config(z_loss_coef=0.0)
    torch.manual_seed(0)
    model = GoHTransformer(cfg).train()
    out = model(torch.randint(0, VOCAB, (2, 6)))
    for record in out.routing:
        assert set(record.aux_losses) == {"head_balance", "expert_balance"}


# ----------------------------------------------------------------------- whole models
def check_padded_equals_unpadded(out, out_ref, keep):
    """Real-token logits and the weighted routing loss of the padded batch equal the unpadded one's."""
    torch.testing.assert_close(out.logits[keep], out_ref.logits.flatten(0, 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.aux_loss, out_ref.aux_loss, rtol=0, atol=1e-6)


def left_padded(ids, pad):
    """``ids [batch, seq]`` behind ``pad`` padding tokens: (padded ids, attention mask, real positions)."""
    padding = torch.zeros(ids.shape[0], pad, dtype=torch.long)
    mask = torch.cat([padding, torch.ones_like(ids)], dim=1)
    return torch.cat([padding, ids], dim=1), mask, mask.bool()


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("ffn", FFNS)
def test_decoder_left_padding_changes_no_routing(router, ffn):
    torch.manual_seed(0)
    model = sharpen(GoHTransformer(config(router, ffn))).train()
    reference = copy.deepcopy(model)
    ids = torch.randint(1, VOCAB, (3, 8))
    padded, mask, keep = left_padded(ids, 5)

    out = model(padded, attention_mask=mask)
    out_ref = reference(ids)
    check_padded_equals_unpadded(out, out_ref, keep)
    assert expert_drops(out_ref.routing).any()
    assert torch.equal(expert_drops(out.routing, keep), expert_drops(out_ref.routing))
    assert_same_balancing(model, reference)


@pytest.mark.parametrize("router", ROUTERS)
def test_decoder_rows_of_different_lengths_route_as_each_row_alone(router):
    # dropless, so a row's routing does not depend on the other rows: the padded batch's logits are
    # each row's alone, and its load counts are the sum of the rows'
    torch.manual_seed(0)
    cfg = config(router, "graph-moe", capacity_factor=None)
    model = sharpen(GoHTransformer(cfg)).train()
    lengths = [7, 3, 5]
    rows = [torch.randint(1, VOCAB, (n,)) for n in lengths]
    width = max(lengths)
    padded = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.arange(width) >= width - len(r) for r in rows]).long()
    alone = [copy.deepcopy(model) for _ in rows]

    out = model(padded, attention_mask=mask)
    counts = {k: torch.zeros_like(v) for k, v in balancing_state(model).items() if k.endswith("load_since_update")}
    for b, (row, row_model) in enumerate(zip(rows, alone)):
        row_out = row_model(row[None])
        torch.testing.assert_close(out.logits[b, width - len(row):], row_out.logits[0], rtol=0, atol=1e-5)
        for name, value in balancing_state(row_model).items():
            if name in counts:
                counts[name] += value
    got = {k: v for k, v in balancing_state(model).items() if k in counts}
    torch.testing.assert_close(got, counts, rtol=0, atol=0)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("ffn", FFNS)
def test_encoder_right_padding_changes_no_routing(router, ffn):
    torch.manual_seed(0)
    model = sharpen(GoHEncoder(config(router, ffn, model_type="encoder"))).train()
    reference = copy.deepcopy(model)
    ids = torch.randint(1, VOCAB, (3, 8))
    padded = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(3, 4, dtype=torch.long)], dim=1)
    keep = mask.bool()

    out = model(padded, attention_mask=mask)
    out_ref = reference(ids)
    check_padded_equals_unpadded(out, out_ref, keep)
    assert torch.equal(expert_drops(out.routing, keep), expert_drops(out_ref.routing))
    assert_same_balancing(model, reference)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("ffn", FFNS)
def test_seq2seq_source_and_target_padding_change_no_routing(router, ffn):
    torch.manual_seed(0)
    model = sharpen(GoHSeq2Seq(config(router, ffn, model_type="seq2seq", position_embedding="t5-relative",
                                      attention_scale="none"))).train()
    reference = copy.deepcopy(model)
    source, target = torch.randint(1, VOCAB, (3, 7)), torch.randint(1, VOCAB, (3, 5))
    source_padded = torch.cat([source, torch.zeros(3, 3, dtype=torch.long)], dim=1)
    source_mask = torch.cat([torch.ones_like(source), torch.zeros(3, 3, dtype=torch.long)], dim=1)
    target_padded = torch.cat([target, torch.zeros(3, 2, dtype=torch.long)], dim=1)
    target_mask = torch.cat([torch.ones_like(target), torch.zeros(3, 2, dtype=torch.long)], dim=1)

    out = model(source_padded, attention_mask=source_mask, decoder_input_ids=target_padded,
                decoder_attention_mask=target_mask)
    out_ref = reference(source, decoder_input_ids=target)
    check_padded_equals_unpadded(out, out_ref, target_mask.bool())
    for kind, keep in (("encoder", source_mask.bool()), ("decoder_self", target_mask.bool())):
        assert torch.equal(expert_drops(out.routing[kind], keep), expert_drops(out_ref.routing[kind]))
    assert_same_balancing(model, reference)


# ----------------------------------------------------------------------- Mixture-of-Recursions
def test_expert_choice_capacity_counts_each_rows_real_tokens():
    router = ExpertChoiceRecursionRouter(8, max_recursions=3, gate_scale=1.0).train()
    torch.manual_seed(0)
    scores = torch.randn(*TOKEN_MASK.shape)
    picked = router.top_tokens(scores, 1, TOKEN_MASK, TOKEN_MASK)
    for b, real in enumerate(TOKEN_MASK):
        alone = router.top_tokens(scores[b, real][None], 1, torch.ones(1, int(real.sum()), dtype=torch.bool))
        assert torch.equal(picked[b, real], alone[0])
        assert not picked[b, ~real].any()


@pytest.mark.parametrize("execution", ("masked", "gather"))
@pytest.mark.parametrize("recursion_router", ("expert-choice", "token-choice"))
def test_recursion_left_padding_changes_no_routing(recursion_router, execution):
    torch.manual_seed(0)
    cfg = config("graph", "moe", n_layers=2, recursion="mor", max_recursions=3, recursion_router=recursion_router,
                 recursion_execution=execution)
    model = sharpen(GoHTransformer(cfg))
    with torch.no_grad():
        for param in model.recursion.router.parameters():
            param.mul_(200.0)  # separated recursion scores: every recursion keeps some tokens, drops others
    model.train()
    reference = copy.deepcopy(model)
    ids = torch.randint(1, VOCAB, (2, 9))
    padded, mask, keep = left_padded(ids, 4)

    out = model(padded, attention_mask=mask)
    out_ref = reference(ids)
    check_padded_equals_unpadded(out, out_ref, keep)
    assert out_ref.recursion.depth.min() < out_ref.recursion.depth.max()
    assert torch.equal(out.recursion.selected[:, keep], out_ref.recursion.selected.flatten(1))
    assert not out.recursion.selected[:, ~keep].any()
    for name, value in out.recursion.aux_losses.items():
        torch.testing.assert_close(value, out_ref.recursion.aux_losses[name], rtol=0, atol=1e-6)
    assert_same_balancing(model, reference)
