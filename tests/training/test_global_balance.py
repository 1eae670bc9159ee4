"""Global-batch balance (DESIGN.md §19): counts pooled over micro-batches and ranks before the
product equal the balance loss, and its gradient, of one batch as large as all of them."""

import functools

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.models.routed import global_batch_balance_loss, weighted_aux_loss
from gohgraph.routers.losses import BalanceTally, global_balance_loss, load_balance_loss
from gohgraph.training.config import TrainConfig
from gohgraph.training.parallel_plan import ParallelPlan
from gohgraph.training.trainer import train
from tests.helpers import TINY, make_corpus

E, K = 6, 2


def _routing(rows: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, E, generator=generator, dtype=torch.float64).requires_grad_()
    selected = logits.detach().topk(K, dim=-1).indices
    return logits, selected


def test_pooled_micro_batches_equal_one_batch_in_value_and_gradient():
    parts = [_routing(rows, seed) for rows, seed in ((7, 0), (5, 1), (9, 2), (3, 3))]
    valid = [torch.rand(len(logits), generator=torch.Generator().manual_seed(i)) > 0.3
             for i, (logits, _) in enumerate(parts)]
    pooled = global_balance_loss([BalanceTally.of(logits.softmax(-1), selected, E, mask)
                                  for (logits, selected), mask in zip(parts, valid)])
    pooled_grads = torch.autograd.grad(pooled, [logits for logits, _ in parts])
    whole = load_balance_loss(torch.cat([logits.softmax(-1) for logits, _ in parts]),
                              torch.cat([selected for _, selected in parts]), E, torch.cat(valid))
    whole_grads = torch.autograd.grad(whole, [logits for logits, _ in parts])
    torch.testing.assert_close(pooled, whole, rtol=0, atol=1e-12)
    for got, expected in zip(pooled_grads, whole_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_ranks_pooled_by_all_reduce_average_to_one_batch():
    """Two ranks, each with two micro-batches; an all_reduce adds the other rank's counts. The mean
    of the ranks' losses and gradients (what data parallelism averages) is the one-batch loss."""
    ranks = [[_routing(6, 10 * r + m) for m in range(2)] for r in range(2)]
    tallies = [[BalanceTally.of(logits.softmax(-1), selected, E) for logits, selected in rank] for rank in ranks]
    local_counts = [torch.cat([sum(t.counts for t in rank), torch.tensor([12.0], dtype=torch.float64)])
                    for rank in tallies]
    losses = []
    for r in range(2):
        def all_reduce(tensor, r=r):
            tensor += local_counts[1 - r].to(tensor.dtype)
        losses.append(global_balance_loss(tallies[r], all_reduce, world_size=2))
    leaves = [logits for rank in ranks for logits, _ in rank]
    mean_grads = torch.autograd.grad((losses[0] + losses[1]) / 2, leaves)
    whole = load_balance_loss(torch.cat([logits.softmax(-1) for logits in leaves]),
                              torch.cat([selected for rank in ranks for _, selected in rank]), E)
    torch.testing.assert_close((losses[0] + losses[1]) / 2, whole, rtol=0, atol=1e-12)
    for got, expected in zip(mean_grads, torch.autograd.grad(whole, leaves)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


ROUTED = dict(TINY, n_heads=4, n_shared_heads=1, top_k_heads=2, ffn="moe", n_experts=4, top_k_experts=2,
              balance_loss_coef=1.0, z_loss_coef=0.0, aux_free_bias=False)
GLOBAL = dict(ROUTED, head_balance_pooling="global-batch", expert_balance_pooling="global-batch")


def test_model_records_pool_to_the_balance_loss_of_the_concatenated_batch():
    torch.manual_seed(0)
    model = GoHTransformer(GoHConfig(**GLOBAL)).train()
    x = torch.randint(0, ROUTED["vocab_size"], (4, 16))
    halves = [model(part, labels=part) for part in x.chunk(2)]
    pooled = global_batch_balance_loss(model.config, [out.routing for out in halves])
    pooled_grads = torch.autograd.grad(pooled, list(model.parameters()), allow_unused=True)
    whole = model(x, labels=x)
    # a forward alone counts its own batch, as "layer" pooling
    torch.testing.assert_close(whole.aux_loss, weighted_aux_loss(model.config.replace(
        head_balance_pooling="layer", expert_balance_pooling="layer"), whole.routing, whole.logits))
    assert float(weighted_aux_loss(model.config, whole.routing, whole.logits, leave_out_global=True)) == 0.0
    whole_grads = torch.autograd.grad(whole.aux_loss, list(model.parameters()), allow_unused=True)
    assert float(pooled.detach()) > 0
    # per micro-batch ("layer"), the two halves' mean is another loss: the test can tell them apart
    layer_mean = sum(weighted_aux_loss(model.config.replace(head_balance_pooling="layer",
                                                            expert_balance_pooling="layer"),
                                       out.routing, out.logits) for out in halves) / 2
    assert abs(float(layer_mean.detach()) - float(pooled.detach())) > 1e-4
    torch.testing.assert_close(pooled, whole.aux_loss, rtol=0, atol=1e-6)
    for got, expected in zip(pooled_grads, whole_grads):
        if expected is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def _accumulated_gradients(tmp_path, cfg: GoHConfig, monkeypatch, accum: int = 2, compile: bool = False) -> tuple:
    """One training step of ``accum`` micro-batches of ``8 / accum`` sequences: its loss and its
    gradients (read before the optimizer step), and whether it ran compiled."""
    captured = {}
    clip = ParallelPlan.clip_gradients

    def spy(plan, model, max_norm):
        captured.update({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        return clip(plan, model, max_norm)

    monkeypatch.setattr(ParallelPlan, "clip_gradients", spy)
    tc = TrainConfig(batch_size=8 // accum, seq_len=32, grad_accum_steps=accum, max_steps=1, warmup_steps=0,
                     grad_clip=0.0, lr=1e-3, device="cpu", compile=compile)
    result = train(cfg, tc, make_corpus(), tmp_path, progress=False)
    return result.losses[0], captured, result.compiled


@pytest.mark.parametrize("accum", [2, 4])
def test_grad_accum_with_global_batch_balance_equals_one_batch_as_large(tmp_path, monkeypatch, accum):
    from gohgraph.data.batches import train_batch

    cfg = GoHConfig(**GLOBAL)
    loss, grads, _ = _accumulated_gradients(tmp_path / "global", cfg, monkeypatch, accum)
    torch.manual_seed(0)
    reference = GoHTransformer(cfg.replace(head_balance_pooling="layer", expert_balance_pooling="layer")).train()
    torch.manual_seed(0)  # the trainer's rank seed: the same router draws (none here: no noise)
    batch = torch.cat([train_batch(make_corpus().train, 8 // accum, 32, 0, 0, micro) for micro in range(accum)])
    out = reference(batch, labels=batch)
    (out.lm_loss + out.aux_loss).backward()
    assert loss == pytest.approx(float((out.lm_loss + out.aux_loss).detach()), rel=1e-6)
    expected = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-6, msg=name)
    # per micro-batch pooling ("layer") gives other router gradients: the comparison can fail
    _, layer_grads, _ = _accumulated_gradients(tmp_path / "layer", reference.config, monkeypatch, accum)
    assert max(float((layer_grads[name] - grad).abs().max()) for name, grad in expected.items()) > 1e-5


def test_compiled_global_batch_step_equals_eager(tmp_path, monkeypatch):
    """aot_eager (tests/training/test_compile.py says why): the compiled forwards, the eager pooled
    product and the one backward through the compiled graphs give the eager step's gradients."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    # head routing only: the expert layer's grouped matmul does not trace on CPU (it falls back)
    cfg = GoHConfig(**dict(GLOBAL, n_layers=1, ffn="dense"))
    eager_loss, eager, _ = _accumulated_gradients(tmp_path / "eager", cfg, monkeypatch)
    loss, grads, compiled = _accumulated_gradients(tmp_path / "compiled", cfg, monkeypatch, compile=True)
    assert compiled
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    assert grads.keys() == eager.keys()
    for name, grad in eager.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_balance_pooling_is_validated_in_one_line():
    with pytest.raises(ValueError, match=r"^head_balance_pooling='model' is not one of \['layer', 'global-batch'\]$"):
        GoHConfig(**dict(ROUTED, head_balance_pooling="model"))
    with pytest.raises(ValueError, match=r"^expert_balance_pooling='global' is not one of"):
        GoHConfig(**dict(ROUTED, expert_balance_pooling="global"))
    GoHConfig(**dict(ROUTED, expert_balance_pooling="global-batch"))


def test_global_batch_refuses_sharded_parallelism(tmp_path):
    tc = TrainConfig(batch_size=4, seq_len=32, max_steps=1, device="cpu", fsdp=True)
    with pytest.raises(ValueError, match="head_balance_pooling='global-batch' works with plain data parallelism"):
        train(GoHConfig(**GLOBAL), tc, make_corpus(), tmp_path, progress=False)
