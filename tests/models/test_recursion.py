"""Mixture-of-Recursions: causal at inference, cached decoding equals recompute, one recursion is the
plain model, expert-choice equals an independent top-k with nested subsets, token-choice's balance loss."""

import math

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.models.recursion import RecursionKVCache
from gohgraph.routers.recursion import ExpertChoiceRecursionRouter, TokenChoiceRecursionRouter

CFG = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, max_seq_len=32, recursion="mor", max_recursions=3)
ROUTERS = ["expert-choice", "token-choice"]
SHARINGS = ["cycle", "middle-cycle"]
KV = ["recursion", "shared"]


def sharpened(model):
    """Recursion routers with clearly separated scores, so that every recursion keeps some tokens
    and drops others (at init the scores are tiny and nearly tied)."""
    with torch.no_grad():
        for name, param in model.recursion.router.named_parameters():
            param.mul_(200.0)
    return model


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("sharing", SHARINGS)
@pytest.mark.parametrize("router", ROUTERS)
def test_later_tokens_never_change_earlier_logits_at_inference(router, sharing, kv):
    torch.manual_seed(0)
    model = sharpened(GoHTransformer(GoHConfig(**CFG, recursion_router=router, recursion_sharing=sharing,
                                               recursion_kv=kv))).eval()
    ids = torch.randint(0, 64, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        out, out_changed = model(ids), model(changed)
    torch.testing.assert_close(out.logits[:, :7], out_changed.logits[:, :7])
    depth = out.recursion.depth
    assert depth.min() == 1 and depth.max() > 1  # some tokens stop early, some go on


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("sharing", SHARINGS)
@pytest.mark.parametrize("router", ROUTERS)
def test_cached_decoding_equals_recompute(router, sharing, kv):
    torch.manual_seed(1)
    model = sharpened(GoHTransformer(GoHConfig(**CFG, recursion_router=router, recursion_sharing=sharing,
                                               recursion_kv=kv))).eval()
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        assert isinstance(cache, RecursionKVCache)
        steps = [model(ids[:, :4], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(4, 11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full.logits, rtol=1e-5, atol=1e-5)
    slots = [cache.length(slot) for slot in range(len(cache.keys))]  # 3 blocks x 3 recursions
    assert slots[:3] == [11] * 3 and set(slots) <= {0, 11}
    if kv == "recursion":  # every position writes each recursion's slot; skipped ones are masked out
        assert torch.equal(cache.took[1], full.recursion.selected[1])
        assert not cache.took[2].all()
        assert slots[3:] == ([0, 11, 0] * 2 if sharing == "middle-cycle" else [11] * 6)
    else:  # KV sharing: only recursion 0 writes keys, the later recursions read them
        assert slots[3:] == [0] * 6 and not cache.took
    if sharing == "cycle":  # generate() builds the right cache itself
        with torch.no_grad():
            cached = model.generate(ids[:, :5], max_new_tokens=4, temperature=0)
            recomputed = model.generate(ids[:, :5], max_new_tokens=4, temperature=0, use_cache=False)
        assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("sharing", SHARINGS)
@pytest.mark.parametrize("router", ROUTERS)
def test_one_recursion_with_every_token_is_the_plain_model(router, sharing):
    torch.manual_seed(0)
    mor = GoHTransformer(GoHConfig(**{**CFG, "max_recursions": 1}, recursion_router=router, recursion_sharing=sharing))
    plain = GoHTransformer(GoHConfig(**{**CFG, "recursion": "none"}))
    missing, unexpected = plain.load_state_dict(mor.state_dict(), strict=False)
    assert not missing and all(name.startswith("recursion.") for name in unexpected)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        out = mor.eval()(ids)
        assert out.recursion.selected.all() and (out.recursion.depth == 1).all()
        assert torch.equal(out.logits, plain.eval()(ids).logits)


def test_expert_choice_selection_is_an_independent_top_k_and_nested():
    torch.manual_seed(0)
    router = ExpertChoiceRecursionRouter(16, max_recursions=4, gate_scale=0.5).train()
    h = torch.randn(3, 10, 16)
    previous = torch.ones(3, 10, dtype=torch.bool)
    for recursion in range(1, 4):
        selected, gate, losses = router(h, recursion, previous)
        scores = (h @ router.scores[recursion - 1].weight.t()).squeeze(-1)
        capacity = math.ceil((4 - recursion) / 4 * 10)
        for b in range(3):  # reference: sort the still-going tokens by score, keep the first ceil(beta T)
            going = [t for t in range(10) if previous[b, t]]
            best = sorted(going, key=lambda t: -scores[b, t].item())[:capacity]
            assert sorted(torch.nonzero(selected[b]).flatten().tolist()) == sorted(best)
        assert not (selected & ~previous).any()  # nested
        torch.testing.assert_close(gate, 0.5 * torch.sigmoid(scores))
        assert set(losses) == {"recursion_aux_bce"}
        previous = selected


def test_expert_choice_in_the_model_keeps_nested_decreasing_shares():
    torch.manual_seed(0)
    model = GoHTransformer(GoHConfig(**CFG, recursion_router="expert-choice")).train()
    out = model(torch.randint(0, 64, (2, 12)))
    selected = out.recursion.selected  # [3, 2, 12]
    assert selected[0].all()
    assert (selected.sum(-1) == torch.tensor([[12, 12], [8, 8], [4, 4]])).all()  # ceil(1, 2/3, 1/3 x 12)
    assert not (selected[2] & ~selected[1]).any()
    assert torch.equal(out.recursion.depth, selected.sum(0))


def test_token_choice_balance_loss_matches_its_formula_on_a_hand_made_example():
    router = TokenChoiceRecursionRouter(2, max_recursions=2)
    with torch.no_grad():
        router.proj.weight.copy_(torch.eye(2))
    # logits = h: tokens 0, 1 prefer depth 1; token 2 depth 2
    h = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]]])
    depth, gate, losses = router(h)
    assert depth.tolist() == [[1, 1, 2]]
    p = torch.softmax(h[0], -1)
    torch.testing.assert_close(gate[0], torch.stack([p[0, 0], p[1, 0], p[2, 1]]))
    f = torch.tensor([2 / 3, 1 / 3])  # share of tokens per depth
    P = p.mean(0)  # mean probability per depth
    expected = 2 * (f * P).sum()
    torch.testing.assert_close(losses["recursion_balance"], expected)
    assert abs(expected.item() - (2 * (2 / 3 * P[0] + 1 / 3 * P[1])).item()) < 1e-7


@pytest.mark.parametrize("changes,message", [
    (dict(recursion="loop"), r"recursion='loop' is not one of \['none', 'mor'\]"),
    (dict(recursion_router="random"), r"recursion_router='random' is not one of \['expert-choice', 'token-choice'\]"),
    (dict(recursion_sharing="sandwich"), r"recursion_sharing='sandwich' is not one of"),
    (dict(max_recursions=0), r"max_recursions=0 must be a positive integer"),
    (dict(n_layers=2, recursion_sharing="middle-cycle"), r"middle-cycle' needs n_layers >= 3"),
    (dict(recursion_gate_scale=0.0), r"recursion_gate_scale=0.0 must be > 0"),
])
def test_recursion_fields_are_validated(changes, message):
    with pytest.raises(ValueError, match=message):
        GoHConfig(**{**CFG, **changes})


def block_attending_to(block, h_query, h_keys):
    """One dense-router block whose queries come from ``h_query`` and whose keys/values come from
    ``h_keys`` (same positions, causal): what KV sharing computes in a later recursion."""
    attn, (batch, seq, d) = block.attn, h_query.shape
    heads, hd = attn.n_heads, attn.head_dim
    q = attn.qkv(block.attn_norm(h_query))[..., :attn.q_width]
    k, v = attn.qkv(block.attn_norm(h_keys))[..., attn.q_width:].split([d, d], -1)
    q, k, v = (t.view(batch, seq, heads, hd).transpose(1, 2) for t in (q, k, v))
    q, k = attn.rotary(q, k, 0)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    h = h_query + attn.out(o.transpose(1, 2).reshape(batch, seq, d))
    return h + block.ffn(block.ffn_norm(h))[0]


@pytest.mark.parametrize("kv", KV)
def test_a_later_recursion_attends_to_the_keys_its_kv_option_names(kv):
    torch.manual_seed(0)
    cfg = GoHConfig(**{**CFG, "n_layers": 1, "max_recursions": 2}, recursion_router="token-choice", recursion_kv=kv)
    model = GoHTransformer(cfg).eval()
    depth = torch.tensor([[1, 2, 1, 2, 2, 2]])  # tokens 0 and 2 stop after recursion 0
    gate = torch.full((1, 6), 0.7)
    model.recursion.router.forward = lambda h, valid=None: (depth, gate, {})  # a router with fixed choices
    ids = torch.randint(0, 64, (1, 6))
    block, took = model.blocks[0], depth > 1
    with torch.no_grad():
        h0 = model.embed(ids)
        h1 = block(h0)[0]
        if kv == "recursion":  # recursion 1 sees only the keys of the tokens that took it
            f = block(h1, mask=took[:, None, None, :])[0]
        else:  # recursion 1's queries attend to recursion 0's keys/values of every token
            f = block_attending_to(block, h1, h0)
        h2 = torch.where(took[..., None], h1 + 0.7 * (f - h1), h1)
        expected = model.final_norm(h2) @ model.embed.weight.t()
        out = model(ids)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.recursion.depth, depth)


def test_router_bce_trains_the_routers_own_scores_and_decides_by_their_sign():
    torch.manual_seed(0)
    router = ExpertChoiceRecursionRouter(16, max_recursions=2, gate_scale=1.0, aux_router=False)
    assert len(router.aux_routers) == 0
    h = torch.randn(2, 8, 16)
    previous = torch.ones(2, 8, dtype=torch.bool)
    scores = (h @ router.scores[0].weight.t()).squeeze(-1)
    selected, _, losses = router.train()(h, 1, previous)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(scores.reshape(-1), selected.reshape(-1).float())
    torch.testing.assert_close(losses["recursion_aux_bce"], expected)
    selected, _, losses = router.eval()(h, 1, previous)
    assert torch.equal(selected, scores > 0) and not losses


def test_router_bce_models_are_causal_and_decode_like_recompute():
    torch.manual_seed(0)
    model = sharpened(GoHTransformer(GoHConfig(**CFG, recursion_inference="router-bce"))).eval()
    ids = torch.randint(0, 64, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = torch.randint(0, 64, (2, 4))
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(model(changed).logits[:, :6], full.logits[:, :6])
        cache = model.new_cache()
        steps = [model(ids[:, t:t + 1], cache=cache).logits for t in range(10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full.logits, rtol=1e-5, atol=1e-5)
    assert 1 < full.recursion.depth.float().mean() < 3


def test_capacity_warmup_starts_with_every_token_and_follows_the_half_cosine():
    from gohgraph.training.schedules import recursion_capacity_warmup

    assert [recursion_capacity_warmup(step, 4) for step in (0, 2, 4, 9)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert recursion_capacity_warmup(3, 0) == 0.0
    torch.manual_seed(0)
    model = GoHTransformer(GoHConfig(**CFG, recursion_router="expert-choice")).train()
    ids = torch.randint(0, 64, (2, 12))
    counts = {}
    for warmup in (1.0, 0.5, 0.0):
        model.set_recursion_capacity_warmup(warmup)
        counts[warmup] = model(ids).recursion.selected.sum(-1)[:, 0].tolist()
    # recursion r keeps ceil((beta_r + (1 - beta_r) w) T) of T = 12, beta = 1, 2/3, 1/3
    assert counts == {1.0: [12, 12, 12], 0.5: [12, 10, 8], 0.0: [12, 8, 4]}
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        model.set_recursion_capacity_warmup(1.5)


HEAD_ROUTERS = {"dense": dict(), "linear": dict(router="linear", top_k_heads=2),
                "graph": dict(router="graph", n_shared_heads=1, top_k_heads=2, router_rounds=1, router_dim=8)}
FFNS = {"dense": dict(), "moe": dict(ffn="moe", n_experts=4), "mh-moe": dict(ffn="mh-moe", n_subtokens=2, n_experts=4),
        "graph-moe": dict(ffn="graph-moe", n_subtokens=2, n_experts=4, router_dim=8)}
RECURSIONS = {"none": dict(), "expert-choice": dict(recursion="mor", recursion_router="expert-choice"),
              "token-choice": dict(recursion="mor", recursion_router="token-choice")}


@pytest.mark.parametrize("recursion", list(RECURSIONS))
@pytest.mark.parametrize("ffn", list(FFNS))
@pytest.mark.parametrize("router", list(HEAD_ROUTERS))
def test_every_router_ffn_and_recursion_combination_learns(router, ffn, recursion):
    torch.manual_seed(0)
    cfg = GoHConfig(**dict(vocab_size=16, d_model=16, n_layers=1, n_heads=4, max_seq_len=16, max_recursions=2,
                           expert_hidden=16), **{**HEAD_ROUTERS[router], **FFNS[ffn], **RECURSIONS[recursion]})
    model = GoHTransformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.arange(8).repeat(2, 2)
    losses = []
    for _ in range(8):
        out = model(ids, labels=ids)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


def test_a_left_padded_batch_generates_what_each_row_generates_alone():
    torch.manual_seed(0)
    model = sharpened(GoHTransformer(GoHConfig(**CFG, recursion_router="token-choice"))).eval()
    short, long = torch.randint(0, 64, (1, 3)), torch.randint(0, 64, (1, 6))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    together = model.generate(batch, max_new_tokens=4, temperature=0, attention_mask=mask)
    assert torch.equal(together[0, 3:], model.generate(short, max_new_tokens=4, temperature=0)[0])
    assert torch.equal(together[1], model.generate(long, max_new_tokens=4, temperature=0)[0])


def graph_sharpened(model):
    """The graph scorer's readout and the auxiliary routers scaled up, and the scorer's head
    embeddings (at init a token-independent offset larger than the tokens' differences) zeroed, so
    that every recursion keeps some tokens and drops others at evaluation."""
    router = model.recursion.router
    with torch.no_grad():
        router.graph_scorer.graph.score.weight.mul_(200.0)
        router.graph_scorer.graph.head_embedding.zero_()
        for param in router.aux_routers.parameters() if hasattr(router, "aux_routers") else ():
            param.mul_(200.0)
    return model


GRAPH_SCORED = {"expert-choice aux-router": dict(recursion_router="expert-choice"),
                "expert-choice router-bce": dict(recursion_router="expert-choice", recursion_inference="router-bce"),
                "token-choice": dict(recursion_router="token-choice")}


@pytest.mark.parametrize("variant", list(GRAPH_SCORED))
def test_graph_scored_recursions_are_causal_and_decode_like_recompute(variant):
    torch.manual_seed(0)
    cfg = GoHConfig(**CFG, **GRAPH_SCORED[variant], recursion_scorer="graph", head_graph="ring", router_dim=8)
    model = graph_sharpened(GoHTransformer(cfg)).eval()
    assert not any(name.startswith("recursion.router.scores") or name == "recursion.router.proj.weight"
                   for name in model.state_dict())  # the graph replaces the linear scores
    ids = torch.randint(0, 64, (2, 11))
    changed = ids.clone()
    changed[:, 6:] = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(model(changed).logits[:, :6], full.logits[:, :6])
        cache = model.new_cache()
        steps = [model(ids[:, :4], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(4, 11)]
        cached = model.generate(ids[:, :5], max_new_tokens=4, temperature=0)
        recomputed = model.generate(ids[:, :5], max_new_tokens=4, temperature=0, use_cache=False)
    torch.testing.assert_close(torch.cat(steps, dim=1), full.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached, recomputed)
    depth = full.recursion.depth
    assert depth.min() == 1 and depth.max() > 1  # some tokens stop early, some go on


@pytest.mark.parametrize("recursion_router", ROUTERS)
def test_graph_scored_recursions_learn_and_reload(recursion_router, tmp_path):
    from gohgraph import from_pretrained

    torch.manual_seed(0)
    cfg = GoHConfig(**dict(vocab_size=16, d_model=16, n_layers=1, n_heads=4, max_seq_len=16, max_recursions=2,
                           router="graph", n_shared_heads=1, top_k_heads=2, router_rounds=1, router_dim=8),
                    recursion="mor", recursion_router=recursion_router, recursion_scorer="graph")
    model = GoHTransformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.arange(8).repeat(2, 2)
    losses = []
    for _ in range(8):
        out = model(ids, labels=ids)
        optimizer.zero_grad()
        out.loss.backward()
        scorer_grad = model.recursion.router.graph_scorer.graph.node_in.weight.grad
        assert scorer_grad is not None and scorer_grad.abs().sum() > 0  # the graph scorer is trained
        optimizer.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    model.save_pretrained(tmp_path / "model")
    reloaded = from_pretrained(tmp_path / "model")
    assert reloaded.config.recursion_scorer == "graph"
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids).logits, model.eval()(ids).logits)


@pytest.mark.parametrize("changes,message", [
    (dict(recursion_scorer="mlp"), r"^recursion_scorer='mlp' is not one of \['linear', 'graph'\]$"),
    (dict(recursion_scorer="Graph"), r"^recursion_scorer='Graph' is not one of \['linear', 'graph'\]$"),
    (dict(recursion_scorer="graph", router_rounds=0), r"^recursion_scorer='graph' needs router_rounds >= 1 .*"
                                                      r"got router_rounds=0$"),
])
def test_recursion_scorer_is_validated_in_one_line(changes, message):
    with pytest.raises(ValueError, match=message) as error:
        GoHConfig(**{**CFG, **changes})
    assert "\n" not in str(error.value)
