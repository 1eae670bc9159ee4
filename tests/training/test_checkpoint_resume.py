"""Checkpoints that survive faults: exact resume, SIGINT, corruption, NaN, pruning."""

import json
import shutil
import signal
import sys

import pytest
import torch

from gohgraph import CheckpointError, GoHConfig, GoHTransformer
from gohgraph.cli.main import main as cli_main
from gohgraph.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
)
from gohgraph.training.config import TrainConfig
from gohgraph.training.metrics import read_metrics
from gohgraph.training.optim import build_optimizer
from gohgraph.training.trainer import TrainingDivergedError, train
from tests.helpers import TINY, at_training_forward, ctrl_c_after_logged_steps, make_corpus, nan_loss, send_ctrl_c

MODELS = {
    "graph_aux_free": TINY,  # graph router, shared + top-k heads, flow, aux-loss-free bias
    "dense": dict(TINY, router="dense", n_shared_heads=0, top_k_heads=None, aux_free_bias=False),
}


def _config(**changes):
    values = dict(batch_size=4, seq_len=32, max_steps=6, lr=5e-3, warmup_steps=2, eval_every=3,
                  eval_batches=2, save_every=3, keep_last=5, log_every=1, aux_warmup_steps=4,
                  device="cpu")
    values.update(changes)
    return TrainConfig(**values)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_resume_reproduces_the_uninterrupted_run(tmp_path, name):
    model_cfg = GoHConfig(**MODELS[name], dropout=0.1)  # dropout: the RNG state must resume too
    corpus = make_corpus()
    straight = train(model_cfg, _config(), corpus, tmp_path / "straight", progress=False)

    # the same run stopped after step 3: keep only its step-3 checkpoint, then resume
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step_000006")
    shutil.rmtree(resumed_dir / "final")
    (resumed_dir / "checkpoints" / "latest").write_text("step_000003\n")
    resumed = train(model_cfg, _config(), corpus, resumed_dir, resume=True, progress=False)

    assert resumed.steps == 6 and resumed.losses == straight.losses[3:]
    assert resumed.val_history == straight.val_history
    for key, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[key]), key
    without_timing = lambda path: [{k: v for k, v in row.items() if k != "tokens_per_s"}  # noqa: E731
                                   for row in read_metrics(path)]
    assert without_timing(resumed_dir / "metrics.csv") == without_timing(tmp_path / "straight" / "metrics.csv")


def test_optimizer_state_flattens_and_restores_exactly():
    torch.manual_seed(0)
    model = GoHTransformer(GoHConfig(**TINY))
    optimizer = build_optimizer(model, 1e-3, 0.1)
    x = torch.randint(0, 256, (2, 16))
    model(x, labels=x).loss.backward()
    optimizer.step()
    state = optimizer.state_dict()
    tensors, meta = optimizer_state_to_flat(state)
    restored = optimizer_state_from_flat(tensors, meta, "optimizer.json")
    assert restored["param_groups"] == state["param_groups"]
    assert set(restored["state"]) == set(state["state"])
    for key, fields in state["state"].items():
        for field_name, value in fields.items():
            assert torch.equal(restored["state"][key][field_name], value)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    at_training_forward(monkeypatch, GoHTransformer, 5, after=nan_loss("lm_loss"))
    with pytest.raises(TrainingDivergedError, match=r"non-finite loss at step 5 .*step_000004"):
        train(GoHConfig(**TINY), _config(save_every=2, max_steps=8), make_corpus(), tmp_path, progress=False)
    assert latest_checkpoint(tmp_path).name == "step_000004"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000002", "step_000004"]
    config, state, _, training_state = load_checkpoint(latest_checkpoint(tmp_path))
    assert training_state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path, capsys):
    train(GoHConfig(**TINY), _config(max_steps=2, save_every=2), make_corpus(), tmp_path, progress=False)
    checkpoint = latest_checkpoint(tmp_path)
    weights = checkpoint / "model.safetensors"
    good_weights = weights.read_bytes()
    weights.write_bytes(good_weights[:200])  # truncated, as after a full disk
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        train(GoHConfig(**TINY), _config(max_steps=4), make_corpus(), tmp_path, resume=True, progress=False)

    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(checkpoint)]) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("checkpoint: ")]
    assert len(err) == 1 and err[0].startswith("gohgraph eval: error:") and "model.safetensors" in err[0]

    weights.write_bytes(good_weights)
    (checkpoint / "optimizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="optimizer.json is not valid JSON"):
        load_checkpoint(checkpoint)
    (checkpoint / "training_state.json").write_text('{"step": 2}')
    with pytest.raises(CheckpointError, match=r"training_state.json lacks \['tokens_seen', 'val_history', 'rng'\]"):
        load_checkpoint(checkpoint)
    (tmp_path / "checkpoints" / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="latest is corrupt"):
        latest_checkpoint(tmp_path)


def test_only_the_last_checkpoints_are_kept(tmp_path):
    result = train(GoHConfig(**TINY), _config(max_steps=5, save_every=1, keep_last=2), make_corpus(),
                   tmp_path, progress=False)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000004", "step_000005"]  # no staging directories left behind
    assert result.checkpoint_path == tmp_path / "checkpoints" / "step_000005"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000005"


def test_sigint_finishes_the_step_then_saves_and_returns(tmp_path, monkeypatch):
    at_training_forward(monkeypatch, GoHTransformer, 3, before=send_ctrl_c)  # Ctrl-C in the middle of step 3
    previous_handler = signal.getsignal(signal.SIGINT)
    result = train(GoHConfig(**TINY), _config(max_steps=50, save_every=100), make_corpus(), tmp_path, progress=False)
    assert result.interrupted and result.steps == 3 and result.final_path is None
    assert signal.getsignal(signal.SIGINT) is previous_handler  # the trainer's handler is removed again
    assert latest_checkpoint(tmp_path) == result.checkpoint_path == tmp_path / "checkpoints" / "step_000003"
    _, state, _, training_state = load_checkpoint(result.checkpoint_path)
    assert training_state["step"] == 3
    for name, tensor in result.model.state_dict().items():  # the saved state is the state after step 3
        assert torch.equal(state[name], tensor), name


@pytest.mark.slow
def test_sigint_saves_a_loadable_checkpoint_and_exits_cleanly(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "gohgraph", "train", "--data", str(text), "--cache-dir", str(tmp_path / "cache"),
               "--run-dir", str(run_dir), "--max-steps", "100000", "--batch-size", "2", "--seq-len", "16",
               "--save-every", "100000", "--eval-every", "100000", "--no-progress", "--device", "cpu",
               "--set", "d_model=32", "--set", "n_layers=1", "--set", "log_every=1"]
    returncode, stdout, stderr = ctrl_c_after_logged_steps(command, run_dir / "metrics.csv", timeout=60)
    assert returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted at step" in stdout
    checkpoint = latest_checkpoint(run_dir)
    config, state, _, training_state = load_checkpoint(checkpoint)
    assert training_state["step"] >= 3
    model = GoHTransformer.from_pretrained(checkpoint)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_resume_refuses_optimizer_state_for_other_parameters(tmp_path):
    train(GoHConfig(**TINY), _config(max_steps=2, save_every=2), make_corpus(), tmp_path, progress=False)
    state_file = latest_checkpoint(tmp_path) / "training_state.json"
    state = json.loads(state_file.read_text())
    state["optimizer_param_names"] = state["optimizer_param_names"][::-1]
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="optimizer state is for other parameters"):
        train(GoHConfig(**TINY), _config(max_steps=4), make_corpus(), tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"model config differs \(d_model: checkpoint 32 vs given 64"):
        train(GoHConfig(**{**TINY, "d_model": 64}), _config(max_steps=4), make_corpus(), tmp_path, resume=True,
              progress=False)
