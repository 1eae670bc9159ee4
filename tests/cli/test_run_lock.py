"""One writer per run directory: ``gohgraph train`` (every ``--objective``) holds the run's lock.

A second train on the same run directory is refused in one line and leaves the first intact; a
lock left by a killed run (its pid gone) is taken over with a one-line notice.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gohgraph.cli.main import main
from gohgraph.models.pretrained import from_pretrained
from gohgraph.storage import read_tensors
from gohgraph.training.metrics import read_metrics
from gohgraph.training.run_dir import RunDir
from tests.helpers import ctrl_c_after_logged_steps, dead_pid, plant_lock

STEPS = 12
FAST = ["--batch-size", "4", "--seq-len", "64", "--eval-every", "10", "--save-every", "10", "--no-progress",
        "--device", "cpu", "--set", "log_every=1", "--set", "eval_batches=2", "--set", "tensorboard=false"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i} + 1\n\n" for i in range(200)))
    return path


def train_command(run_dir, text_file, seed):
    return [sys.executable, "-m", "gohgraph", "train", "--preset", "tiny", "--run-dir", str(run_dir),
            "--data", str(text_file), "--cache-dir", str(run_dir.parent / "cache"), "--seed", str(seed),
            "--max-steps", str(STEPS), *FAST]


def test_a_second_train_on_one_run_dir_is_refused_and_the_first_finishes_intact(tmp_path, text_file):
    run = RunDir(tmp_path / "race")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(train_command(run.path, text_file, seed=1), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while not run.lock_file.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        # paused while the second starts, so the first is surely mid-run (not finished) when it asks
        os.kill(first.pid, signal.SIGSTOP)
        assert first.poll() is None and run.lock_file.exists(), first.communicate()
        try:
            second = subprocess.run(train_command(run.path, text_file, seed=2), capture_output=True, text=True,
                                    env=env, timeout=300)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    assert second.returncode == 1 and second.stdout == ""
    assert "Traceback" not in second.stderr
    refusal = second.stderr.strip().splitlines()
    assert len(refusal) == 1, second.stderr
    assert refusal[0].startswith("gohgraph train: error: run dir ")
    assert str(run.path) in refusal[0] and f"pid {first.pid}" in refusal[0]

    # the first run, whole and alone: every step's row, its seed, a final model equal to its last checkpoint
    assert [row["step"] for row in read_metrics(run.metrics_file)] == list(range(1, STEPS + 1))
    assert json.loads(run.train_config_file.read_text())["seed"] == 1
    final = from_pretrained(run.final_dir)
    last = read_tensors(run.latest_checkpoint() / "model.safetensors")
    assert run.latest_checkpoint() == run.checkpoint_dir(STEPS)
    assert all(torch.equal(tensor, last[name]) for name, tensor in final.state_dict().items())
    assert not run.lock_file.exists()


def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path, text_file, capsys):
    run = RunDir(tmp_path / "run")
    pid = dead_pid()
    plant_lock(run, pid)
    assert main(["train", "--preset", "tiny", "--run-dir", str(run.path), "--data", str(text_file),
                 "--cache-dir", str(tmp_path / "cache"), "--max-steps", "2", *FAST]) == 0
    err = capsys.readouterr().err
    notices = [line for line in err.splitlines() if "took over" in line]
    assert len(notices) == 1 and f"pid {pid}" in notices[0] and str(run.lock_file) in notices[0]
    assert (run.final_dir / "model.safetensors").is_file() and not run.lock_file.exists()


@pytest.mark.parametrize("objective", ["mlm", "classify", "seq2seq"])
def test_objective_runs_are_refused_while_another_writer_holds_the_run(tmp_path, objective, other_process,
                                                                       capsys):
    run_dir = tmp_path / "run"
    plant_lock(RunDir(run_dir), other_process.pid)
    assert main(["train", "--objective", objective, "--run-dir", str(run_dir), "--max-steps", "1",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run_dir) in err[0] and f"pid {other_process.pid}" in err[0], err
    assert sorted(p.name for p in run_dir.iterdir()) == [RunDir.LOCK]  # nothing written


def test_an_objective_run_takes_over_a_stale_lock(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    plant_lock(run, dead_pid())
    assert main(["train", "--objective", "mlm", "--run-dir", str(run.path), "--max-steps", "2", "--batch-size", "4",
                 "--seq-len", "32", "--set", "eval_batches=1", "--set", "tensorboard=false", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert sum("took over" in line for line in capsys.readouterr().err.splitlines()) == 1
    assert (run.final_dir / "model.safetensors").is_file() and not run.lock_file.exists()


def test_ctrl_c_releases_the_lock(tmp_path, text_file):
    run = RunDir(tmp_path / "run")
    command = train_command(run.path, text_file, seed=1)
    command[command.index("--max-steps") + 1] = "1000"
    returncode, _, stderr = ctrl_c_after_logged_steps(command, run.metrics_file, steps=2)
    assert returncode == 130, stderr
    assert run.latest_checkpoint() is not None and not run.lock_file.exists()
