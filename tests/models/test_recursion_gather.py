"""Mixture-of-Recursions that gathers (docs/skipping-work.md) equals the masked reference: outputs and
gradients for both routers, both KV options, both sharings, left padding and routed heads inside the
stack; generation is unchanged."""

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer

CFG = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, max_seq_len=40, recursion="mor", max_recursions=3)


def sharpened(model):
    """Separated recursion scores, so every recursion keeps some tokens and drops others."""
    with torch.no_grad():
        for param in model.recursion.router.parameters():
            param.mul_(200.0)
    return model


def run(model, mode, ids, mask):
    model.set_execution(recursion_execution=mode)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, attention_mask=mask)
    # the LM loss and the recursion router's losses: routed heads inside the stack balance over the
    # tokens each mode runs them on, so their losses differ by design (module docstring)
    (out.lm_loss + sum(out.recursion.aux_losses.values(), torch.zeros(()))).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("sharing", ["cycle", "middle-cycle"])
@pytest.mark.parametrize("kv", ["recursion", "shared"])
@pytest.mark.parametrize("router", ["expert-choice", "token-choice"])
def test_gathered_equals_masked_in_outputs_and_gradients(router, kv, sharing, padded):
    torch.manual_seed(0)
    model = sharpened(GoHTransformer(GoHConfig(**CFG, recursion_router=router, recursion_kv=kv,
                                               recursion_sharing=sharing)))
    ids = torch.randint(0, 64, (3, 21))
    mask = None
    if padded:
        mask = torch.ones(3, 21, dtype=torch.long)
        mask[0, :5], mask[2, :9] = 0, 0
    masked, masked_grads = run(model, "masked", ids, mask)
    gathered, gathered_grads = run(model, "gather", ids, mask)
    real = torch.ones(3, 21, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(gathered.logits[real], masked.logits[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(gathered.recursion.selected, masked.recursion.selected)
    assert 0 < gathered.recursion.selected[-1].float().mean() < 1  # some tokens skip the last recursion
    assert gathered_grads.keys() == masked_grads.keys()
    for name, grad in masked_grads.items():
        torch.testing.assert_close(gathered_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("router", ["linear", "graph"])
def test_routed_heads_inside_the_stack_give_the_same_function(router):
    torch.manual_seed(1)
    model = sharpened(GoHTransformer(GoHConfig(**CFG, router=router, n_shared_heads=1, top_k_heads=2)))
    ids = torch.randint(0, 64, (2, 17))
    masked, masked_grads = run(model, "masked", ids, None)
    gathered, gathered_grads = run(model, "gather", ids, None)
    torch.testing.assert_close(gathered.logits, masked.logits, rtol=1e-5, atol=1e-5)
    for name, grad in masked_grads.items():
        torch.testing.assert_close(gathered_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    # the records cover every token: gates where a token took the recursion, zeros where it skipped
    record = gathered.routing[-1]
    took = gathered.recursion.selected[-1]
    assert record.head_gates.shape == (2, 17, 4)
    assert (record.head_gates[~took] == 0).all() and (record.head_gates[took].sum(-1) > 0).all()


@pytest.mark.parametrize("kv", ["recursion", "shared"])
def test_generation_and_recompute_agree_under_either_mode(kv):
    """Cached decoding runs masked (a cache is passed), recompute gathers: the tokens agree."""
    torch.manual_seed(2)
    model = sharpened(GoHTransformer(GoHConfig(**CFG, recursion_kv=kv))).eval()
    prompt = torch.randint(0, 64, (2, 6))
    cached = model.generate(prompt, max_new_tokens=6, temperature=0)
    model.set_execution(recursion_execution="gather")
    recomputed = model.generate(prompt, max_new_tokens=6, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_gather_is_refused_where_the_mask_is_relative():
    with pytest.raises(ValueError, match="recursion_execution='gather'"):
        GoHConfig(**CFG, sliding_window=4, recursion_execution="gather")
