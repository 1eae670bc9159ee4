"""Stochastic routing: deterministic and noiseless at eval; in training, Gumbel-top-k samples heads and
experts with their softmax probabilities (within binomial error over 20k draws)."""

import itertools
import math

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.routers.experts import ExpertGate
from gohgraph.routers.heads import HeadGate
from gohgraph.routers.noise import RouterNoise

DRAWS = 20_000
SIGMAS = 4.5  # a frequency further than this many binomial standard errors from its probability fails
CFG = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
NOISY = ["noisy-top-k", "gumbel", "jitter"]
LOGITS = torch.tensor([1.2, 0.3, -0.4, 0.0, -1.5])


def inclusion_probabilities(p, k):
    """P(node i is among k nodes drawn without replacement in proportion to p), by enumerating every
    ordered draw (the Plackett-Luce probability of the sequence)."""
    inclusion = [0.0] * len(p)
    for order in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        for i in order:
            inclusion[i] += prob
    return inclusion


def assert_binomial(counts, probabilities, draws=DRAWS):
    for count, prob in zip(counts, probabilities):
        tolerance = SIGMAS * math.sqrt(prob * (1 - prob) / draws)
        assert abs(count / draws - prob) <= tolerance, (count / draws, prob, tolerance)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gumbel_top_k_heads_are_sampled_in_proportion_to_softmax(k):
    torch.manual_seed(0)
    gate = HeadGate(GoHConfig(**{**CFG, "n_heads": 5, "d_model": 40}, router="linear", top_k_heads=k,
                              head_router_noise="gumbel")).train()
    logits = LOGITS.expand(DRAWS, 5)
    gates = gate(torch.zeros(DRAWS, 40), logits).gates
    assert ((gates > 0).sum(-1) == k).all()
    p = torch.softmax(LOGITS.double(), -1).tolist()
    assert_binomial((gates > 0).sum(0).tolist(), inclusion_probabilities(p, k))
    # the gates of the sampled heads are the noiseless softmax over them (times k, MoH's scaling)
    row = gates[0]
    chosen = row > 0
    torch.testing.assert_close(row[chosen], k * torch.softmax(LOGITS[chosen], -1))


@pytest.mark.parametrize("k", [1, 2])
def test_gumbel_top_k_experts_first_choice_and_inclusion_match_softmax(k):
    torch.manual_seed(1)
    cfg = GoHConfig(**CFG, ffn="moe", n_experts=5, top_k_experts=k, expert_router_noise="gumbel")
    gate = ExpertGate(cfg, torch.ones(1, 5, dtype=torch.bool)).train()
    choice = gate(LOGITS.expand(DRAWS, 1, 5))
    p = torch.softmax(LOGITS.double(), -1).tolist()
    first = torch.bincount(choice.indices[:, 0, 0], minlength=5).tolist()
    assert_binomial(first, p)  # the first of k is drawn with probability p_i
    included = torch.bincount(choice.indices.reshape(-1), minlength=5).tolist()
    assert_binomial(included, inclusion_probabilities(p, k))


def test_noisy_top_k_noise_has_the_learned_softplus_scale():
    torch.manual_seed(0)
    noise = RouterNoise("noisy-top-k", 3, 4).train()
    x = torch.randn(DRAWS, 3)
    selecting, weighting = noise(torch.zeros(DRAWS, 4), x)
    assert selecting is weighting  # Shazeer: the noisy logits select and weigh
    assert selecting.std().item() == pytest.approx(math.log(2.0), rel=0.03)  # W_noise = 0: softplus(0) = ln 2
    with torch.no_grad():
        noise.noise_weight.copy_(torch.tensor([[0.0, 0.0, 0.0]] * 3 + [[2.0, 0.0, 0.0]]))
    selecting, _ = noise(torch.zeros(DRAWS, 4), x)
    expected_std = torch.nn.functional.softplus(2.0 * x[:, 0])
    z = selecting[:, 3] / expected_std
    assert z.std().item() == pytest.approx(1.0, rel=0.03)
    selecting.sum().backward()  # the noise scale learns through the logits it perturbs
    assert noise.noise_weight.grad is not None and noise.noise_weight.grad.abs().sum() > 0


def test_jitter_multiplies_the_logits_within_eps():
    torch.manual_seed(0)
    noise = RouterNoise("jitter", 3, 4, jitter_eps=0.1).train()
    logits = torch.randn(DRAWS, 4)
    jittered, _ = noise(logits, None)
    ratio = jittered / logits
    assert ratio.min() >= 0.9 and ratio.max() <= 1.1 and abs(ratio.mean().item() - 1.0) < 0.005


@pytest.mark.parametrize("noise", NOISY)
@pytest.mark.parametrize("changes", [dict(router="graph", n_shared_heads=1, top_k_heads=2),
                                     dict(router="linear", top_k_heads=2, ffn="mh-moe", n_subtokens=2, n_experts=6),
                                     dict(ffn="moe", n_experts=4, expert_score="sigmoid")])
def test_eval_is_deterministic_and_equals_the_noiseless_router(noise, changes):
    torch.manual_seed(0)
    plain = GoHTransformer(GoHConfig(**CFG, **changes))
    noisy = GoHTransformer(GoHConfig(**CFG, **changes, head_router_noise=noise, expert_router_noise=noise,
                                     router_jitter_eps=0.5))  # wide jitter: small logits reorder visibly
    missing, unexpected = noisy.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(name.endswith("noise.noise_weight") for name in missing)
    ids = torch.randint(0, 64, (2, 12))
    plain.eval(), noisy.eval()
    with torch.no_grad():
        expected = plain(ids)
        first, second = noisy(ids), noisy(ids)
    assert torch.equal(first.logits, expected.logits) and torch.equal(second.logits, expected.logits)
    for got, want in zip(first.routing, expected.routing):
        assert torch.equal(got.head_gates, want.head_gates)
        if want.experts is not None:
            assert torch.equal(got.expert_indices, want.expert_indices)
    # in training the same weights route differently from one call to the next
    noisy.train()
    records = [noisy(ids).routing for _ in range(3)]
    differs = [any(not torch.equal(a.head_gates, b.head_gates) or
                   (a.experts is not None and not torch.equal(a.expert_indices, b.expert_indices))
                   for a, b in zip(records[0], other)) for other in records[1:]]
    assert any(differs)


@pytest.mark.parametrize("changes,message", [
    (dict(head_router_noise="dropout"), r"head_router_noise='dropout' is not one of \['none', 'noisy-top-k', 'gumbel', 'jitter'\]"),
    (dict(expert_router_noise="gauss"), r"expert_router_noise='gauss' is not one of"),
    (dict(router_jitter_eps=1.0), r"router_jitter_eps=1.0 must be in \[0, 1\)"),
    (dict(router_jitter_eps="lots"), r"router_jitter_eps='lots' must be a finite number"),
])
def test_noise_fields_are_validated(changes, message):
    with pytest.raises(ValueError, match=message):
        GoHConfig(**CFG, **changes)


def test_noisy_models_train():
    torch.manual_seed(0)
    model = GoHTransformer(GoHConfig(**CFG, router="linear", top_k_heads=2, ffn="moe", n_experts=4,
                                     head_router_noise="noisy-top-k", expert_router_noise="gumbel"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.arange(16).repeat(4, 2)
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
