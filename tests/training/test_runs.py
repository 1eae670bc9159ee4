"""Runs a researcher can trust: Ctrl-C during a save, staging left by a kill, which checkpoint a
run directory means, and the memory check before a step."""

import os
import signal
import time

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.analysis.timing import saved_tensor_bytes
from gohgraph.data.batches import train_batch
from gohgraph.training import checkpoint as checkpoint_module
from gohgraph.training.checkpoint import latest_checkpoint, load_checkpoint, resolve_checkpoint
from gohgraph.training.config import TrainConfig
from gohgraph.training.memory import check_step_fits, estimate_step_memory
from gohgraph.training.trainer import train
from tests.helpers import TINY, make_corpus


def small_run(**changes):
    values = dict(batch_size=4, seq_len=32, max_steps=4, lr=5e-3, warmup_steps=1, eval_every=2, eval_batches=1,
                  save_every=2, keep_last=5, device="cpu", tensorboard=False)
    return TrainConfig(**{**values, **changes})


def test_two_ctrl_c_during_a_save_leave_a_complete_checkpoint_and_a_resumable_run(tmp_path, monkeypatch):
    """A hook inside the checkpoint write sends SIGINT twice: the first asks to stop, the second
    would interrupt at once, but it waits until the save is complete."""
    real_save, calls = checkpoint_module.atomic_save_tensors, []

    def save_with_two_ctrl_c(path, tensors, metadata=None):
        calls.append(path.name)
        if len(calls) == 4:  # the first tensor file of the second checkpoint (step 4): mid-save
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # let both signals be handled here, in the middle of the save
        return real_save(path, tensors, metadata)

    monkeypatch.setattr(checkpoint_module, "atomic_save_tensors", save_with_two_ctrl_c)
    with pytest.raises(KeyboardInterrupt):  # honoured, but only once the save was complete
        train(GoHConfig(**TINY), small_run(max_steps=6), make_corpus(), tmp_path, progress=False)
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_000004"
    _, _, _, state = load_checkpoint(latest)  # every file of it is there and readable
    assert state["step"] == 4
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(checkpoint_module, "atomic_save_tensors", real_save)
    resumed = train(GoHConfig(**TINY), small_run(max_steps=6), make_corpus(), tmp_path, resume=True, progress=False)
    assert resumed.steps == 6 and not resumed.interrupted


def test_staging_left_by_a_killed_save_is_removed_at_the_next_start(tmp_path, capsys):
    train(GoHConfig(**TINY), small_run(max_steps=2), make_corpus(), tmp_path, progress=False)
    staging = tmp_path / "checkpoints" / ".step_000004.abc123"  # what SIGKILL during a save leaves
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"\0" * 1000)
    temp = tmp_path / ".train_config.json.x1y2.tmp"
    temp.write_text("partial")
    train(GoHConfig(**TINY), small_run(max_steps=4), make_corpus(), tmp_path, resume=True, progress=True)
    assert not staging.exists() and not temp.exists()
    printed = capsys.readouterr()
    assert f"removed {staging}" in printed.out + printed.err


def test_a_run_directory_means_its_newest_complete_model(tmp_path):
    done = train(GoHConfig(**TINY), small_run(max_steps=2), make_corpus(), tmp_path, progress=False)
    assert resolve_checkpoint(tmp_path) == done.final_path  # written after the last checkpoint
    time.sleep(0.01)
    # a resumed run interrupted before its end leaves a checkpoint newer than the earlier final/
    later = train(GoHConfig(**TINY), small_run(max_steps=4), make_corpus(), tmp_path, resume=True, progress=False)
    assert resolve_checkpoint(tmp_path) == later.final_path
    os.utime(later.final_path / "config.json", ns=(0, 0))  # as if final/ were from an earlier run
    assert resolve_checkpoint(tmp_path) == latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000004"
    assert resolve_checkpoint(tmp_path / "checkpoints" / "step_000002") == tmp_path / "checkpoints" / "step_000002"


@pytest.mark.parametrize("changes", [dict(), dict(router="linear"), dict(ffn="moe", n_experts=4),
                                     dict(dropout=0.1, router="dense")])
def test_memory_estimate_covers_what_a_step_holds(changes):
    cfg = GoHConfig(**{**TINY, **changes, "max_seq_len": 65})
    tc = small_run(seq_len=64, batch_size=8)
    memory = estimate_step_memory(cfg, tc, GoHTransformer)
    model = GoHTransformer(cfg).train()
    assert memory.parameters == model.num_parameters()
    batch = train_batch(make_corpus().train, tc.batch_size, tc.seq_len, 0, 0)
    measured = saved_tensor_bytes(lambda: model(batch, labels=batch).loss.backward(), exclude=model.parameters())
    assert measured <= memory.activations <= 4 * measured  # generous, not absurd
    check_step_fits(memory, memory.total, tc, cfg)  # fits exactly
    with pytest.raises(ValueError, match=r"a training step needs about .* GiB .* lower batch_size"):
        check_step_fits(memory, memory.total - 1, tc, cfg)


@pytest.mark.parametrize("objective", ["mlm", "classify", "seq2seq"])
def test_memory_estimate_covers_an_objective_step(objective):
    from gohgraph import GoHEncoder, GoHSeq2Seq

    torch.manual_seed(0)
    shape = dict(vocab_size=260, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2,
                 router="graph", router_dim=8, max_seq_len=65)
    batch_size, seq_len = 8, 64
    tokens = torch.randint(0, 256, (batch_size, seq_len))
    if objective == "seq2seq":
        cfg = GoHConfig(**shape, model_type="seq2seq", n_decoder_layers=3, pad_token_id=258)
        model = GoHSeq2Seq(cfg).train()
        step = lambda: model(tokens, torch.ones_like(tokens), labels=tokens.flip(1)).loss.backward()  # noqa: E731
    else:
        cfg = GoHConfig(**shape, model_type="encoder", n_labels=3 if objective == "classify" else 0)
        model = GoHEncoder(cfg).train()
        step = (lambda: model(tokens, class_labels=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).loss.backward()) \
            if objective == "classify" else (lambda: model(tokens, labels=tokens).loss.backward())
    memory = estimate_step_memory(cfg, small_run(seq_len=seq_len, batch_size=batch_size), type(model))
    assert memory.parameters == sum(p.numel() for p in model.parameters())
    measured = saved_tensor_bytes(step, exclude=model.parameters())
    assert measured <= memory.activations <= 4 * measured  # generous, not absurd


def test_objective_training_refuses_a_step_that_cannot_fit_before_allocating(tmp_path):
    cfg = GoHConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=4, model_type="encoder", max_seq_len=200_001)
    with pytest.raises(ValueError, match="a training step needs about"):
        train(cfg, small_run(seq_len=200_000, batch_size=512), make_corpus(), tmp_path, task="mlm", progress=False)
    assert not any(tmp_path.iterdir())


def test_training_refuses_a_step_that_cannot_fit_before_allocating(tmp_path):
    cfg = GoHConfig(**{**TINY, "max_seq_len": 200_001})
    with pytest.raises(ValueError, match="a training step needs about"):
        train(cfg, small_run(seq_len=200_000, batch_size=512), make_corpus(), tmp_path, progress=False)
    assert not tmp_path.joinpath("checkpoints").exists()
