"""Trainer pieces: TrainConfig, schedule, weight-decay groups, evaluate, and a short run."""

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.data.batches import eval_batches
from gohgraph.training.config import TrainConfig
from gohgraph.training.metrics import COLUMNS
from gohgraph.training.optim import build_optimizer, parameter_groups
from gohgraph.training.schedules import learning_rate
from gohgraph.training.trainer import evaluate, train
from tests.helpers import TINY, make_corpus


def test_train_config_validates_and_round_trips():
    cfg = TrainConfig(batch_size=4, seq_len=16, lr=2e-3, grad_accum_steps=2)
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match=r"TrainConfig.batch_size=0 must be a positive integer"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"TrainConfig.dtype='fp8' is not one of"):
        TrainConfig(dtype="fp8")
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_learning_rate_warmup_then_cosine():
    base, warm, total = 1e-3, 10, 110
    assert learning_rate(0, base, warm, total) == pytest.approx(base / 10)
    assert learning_rate(9, base, warm, total) == pytest.approx(base)
    assert learning_rate(10, base, warm, total) == pytest.approx(base)
    # halfway through the decay the cosine is at its midpoint: (0.1 + 1) / 2 of base
    assert learning_rate(60, base, warm, total) == pytest.approx(base * 0.55)
    assert learning_rate(110, base, warm, total) == pytest.approx(base * 0.1)
    assert learning_rate(500, base, warm, total) == pytest.approx(base * 0.1)


@pytest.mark.parametrize("normalisation", ["mha", "moh"])  # MoH's stage weights have no bias
def test_weight_decay_skips_norms_biases_embeddings_and_router_vectors(normalisation):
    model = GoHTransformer(GoHConfig(**TINY, head_gate_normalisation=normalisation))
    decay, no_decay = parameter_groups(model, 0.1)
    names_decay, names_rest = set(decay["param_names"]), set(no_decay["param_names"])
    all_names = {n for n, _ in model.named_parameters()}
    assert names_decay | names_rest == all_names and not names_decay & names_rest
    assert "embed.weight" in names_rest
    assert "blocks.0.attn_norm.weight" in names_rest
    assert "blocks.0.attn.head_routing.router.head_bias" in names_rest
    assert "blocks.0.attn.head_routing.router.head_embedding" in names_rest
    if normalisation == "mha":
        assert "blocks.0.attn.head_routing.gate.stage_mix.bias" in names_rest
    assert "blocks.0.attn.qkv.weight" in names_decay
    assert "blocks.1.ffn.mlp.down.weight" in names_decay
    assert all(model.get_parameter(n).dim() >= 2 for n in names_decay)
    optimizer = build_optimizer(model, 1e-3, 0.1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_evaluate_is_the_mean_next_token_loss():
    torch.manual_seed(0)
    model = GoHTransformer(GoHConfig(**TINY)).eval()
    tokens = np.random.default_rng(0).integers(0, 256, 700).astype(np.uint16)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 700 // 32 * 32, 32):  # every whole window, computed one at a time
            window = torch.from_numpy(tokens[start:start + 32].astype(np.int64))[None]
            logits = model(window).logits[0]
            total += F.cross_entropy(logits[:-1], window[0, 1:], reduction="sum").item()
            count += 31
    assert evaluate(model, tokens, batch_size=5, seq_len=32) == pytest.approx(total / count, rel=1e-5)
    first_two = sum(1 for _ in eval_batches(tokens, 5, 32, max_batches=2))
    assert first_two == 2


def test_short_run_learns_and_writes_metrics(tmp_path):
    corpus = make_corpus()
    tc = TrainConfig(batch_size=8, seq_len=32, max_steps=30, lr=1e-2, warmup_steps=3, eval_every=10,
                     eval_batches=4, save_every=15, log_every=5, aux_warmup_steps=5, device="cpu")
    result = train(GoHConfig(**TINY), tc, corpus, tmp_path, progress=False)
    assert [s for s, _, _ in result.val_history] == [10, 20, 30]
    assert [t for _, t, _ in result.val_history] == [10 * 8 * 32, 20 * 8 * 32, 30 * 8 * 32]
    assert result.val_history[-1][2] < result.val_history[0][2] < math.log(256)
    assert result.final_val_loss == result.val_history[-1][2]
    assert result.final_val_loss == pytest.approx(evaluate(result.model, corpus.val, 8, 32, 4), rel=1e-6)
    assert result.steps == 30 and result.tokens_seen == 30 * 8 * 32 and result.tokens_per_s > 0

    with open(result.metrics_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == COLUMNS
    assert [int(r["step"]) for r in rows] == [1, 5, 10, 15, 20, 25, 30]
    # the CSV holds 6 significant digits (rounding error up to 5e-6 relative)
    assert [float(r["val_loss"]) for r in rows if r["val_loss"]] == pytest.approx(
        [v for _, _, v in result.val_history], rel=1e-5)
    assert float(rows[0]["aux_scale"]) == 0.0 and float(rows[-1]["aux_scale"]) == 1.0
    assert all(0 <= float(r["head_load_cv"]) < 2 for r in rows)
    assert all(float(r["active_heads"]) == 3.0 for r in rows)  # 1 shared + top-2 routed

    # aux-loss-free balancing ran after optimizer steps: selection biases moved off zero
    biases = [m.selection_bias for m in result.model.modules() if hasattr(m, "selection_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)
    reloaded = GoHTransformer.from_pretrained(result.final_path)
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """grad_accum_steps=2 of 4 sequences == the same 8 sequences in one batch (linear losses)."""
    from gohgraph.data.batches import train_batch

    cfg = GoHConfig(**{**TINY, "router": "dense", "n_shared_heads": 0, "top_k_heads": None})
    corpus = make_corpus()
    tc = TrainConfig(batch_size=4, seq_len=32, grad_accum_steps=2, max_steps=1, warmup_steps=0,
                     grad_clip=0.0, lr=1e-3, device="cpu")
    result = train(cfg, tc, corpus, tmp_path, progress=False)

    torch.manual_seed(0)
    reference = GoHTransformer(cfg)
    optimizer = build_optimizer(reference, 1e-3, tc.weight_decay, (tc.beta1, tc.beta2))
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(0, 1e-3, 0, 1)
    batch = torch.cat([train_batch(corpus.train, 4, 32, 0, 0, micro) for micro in range(2)])
    reference(batch, labels=batch).lm_loss.backward()
    optimizer.step()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)


def test_training_windows_must_fit_the_model(tmp_path):
    with pytest.raises(ValueError, match="seq_len=64 \\+ 1 exceeds the model's max_seq_len=33"):
        train(GoHConfig(**TINY), TrainConfig(seq_len=64), make_corpus(), tmp_path, progress=False)


def test_recursion_capacity_warmup_is_set_before_every_step(tmp_path, monkeypatch):
    from gohgraph.training.schedules import recursion_capacity_warmup

    shares = []
    original = GoHTransformer.set_recursion_capacity_warmup
    monkeypatch.setattr(GoHTransformer, "set_recursion_capacity_warmup",
                        lambda self, value: (shares.append(value), original(self, value)))
    cfg = GoHConfig(**{**TINY, "n_layers": 1}, recursion="mor", max_recursions=2)
    tc = TrainConfig(batch_size=2, seq_len=16, max_steps=3, eval_every=3, eval_batches=1, save_every=3,
                     recursion_warmup_steps=2, device="cpu")
    train(cfg, tc, make_corpus(n_train=4_000, n_val=1_000), tmp_path, progress=False)
    assert shares == [recursion_capacity_warmup(step, 2) for step in range(3)] == [1.0, 0.5, 0.0]
