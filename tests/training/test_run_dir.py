"""RunDir: the names of a run directory, its newest checkpoint, and its lock (one writer per run)."""

import json
import os
import socket

import pytest

from gohgraph.training.run_dir import RunDir, RunDirLockedError
from tests.helpers import dead_pid, plant_lock


def test_the_names_are_the_files_runs_have_always_had(tmp_path):
    run = RunDir(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in (
        run.train_config_file, run.model_config_file, run.data_file, run.objective_file, run.metrics_file,
        run.evaluations_file, run.tensorboard_dir, run.latest_pointer, run.final_dir, run.checkpoint_dir(100))] == [
        "train_config.json", "model_config.json", "data.json", "objective.json", "metrics.csv", "metrics.json",
        "tensorboard", "checkpoints/latest", "final", "checkpoints/step_000100"]


def test_latest_checkpoint_follows_the_pointer_else_the_highest_complete_step(tmp_path):
    run = RunDir(tmp_path)
    assert run.latest_checkpoint() is None
    for step in (2, 4, 6):
        run.checkpoint_dir(step).mkdir(parents=True)
    for step in (2, 4):  # step 6 never got its training_state.json: incomplete
        (run.checkpoint_dir(step) / "training_state.json").write_text("{}")
    assert run.latest_checkpoint() == run.checkpoint_dir(4)
    run.latest_pointer.write_text("step_000002\n")
    assert run.latest_checkpoint() == run.checkpoint_dir(2)


def test_of_checkpoint_finds_the_run_of_a_model_directory(tmp_path):
    run = RunDir(tmp_path / "run")
    run.checkpoint_dir(3).mkdir(parents=True)
    run.final_dir.mkdir()
    run.train_config_file.write_text("{}")
    for model_dir in (run.path, run.final_dir, run.checkpoint_dir(3)):
        assert RunDir.of_checkpoint(model_dir).path == run.path
    assert RunDir.of_checkpoint(tmp_path) is None


def test_the_lock_is_held_inside_and_released_after_even_on_errors(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        with run.lock():
            holder = run.lock_holder()
            assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
            (run.path / "metrics.csv").write_text("step\n")
            raise KeyboardInterrupt
    assert run.lock_holder() is None and not run.lock_file.exists()


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    run = RunDir(tmp_path)
    with run.lock():
        with RunDir(tmp_path).lock():
            pass
        assert run.lock_holder()["pid"] == os.getpid()  # the inner release kept the outer hold
    assert not run.lock_file.exists()


def test_a_directory_the_lock_created_goes_if_nothing_was_written(tmp_path):
    with pytest.raises(ValueError, match="bad flag"):
        with RunDir(tmp_path / "new").lock():
            raise ValueError("bad flag")
    assert not (tmp_path / "new").exists()


def test_a_second_writer_is_refused_naming_the_directory_and_the_pid(tmp_path, other_process):
    run = RunDir(tmp_path)
    plant_lock(run, other_process.pid)
    with pytest.raises(RunDirLockedError) as refused:
        with run.lock():
            pytest.fail("entered a locked run dir")
    message = str(refused.value)
    assert str(tmp_path) in message and f"pid {other_process.pid}" in message and "\n" not in message
    assert run.lock_holder()["pid"] == other_process.pid  # the holder's lock is untouched


def test_a_lock_of_a_dead_process_is_taken_over_with_one_line(tmp_path):
    run, notices = RunDir(tmp_path), []
    pid = dead_pid()
    plant_lock(run, pid)
    with run.lock(notice=notices.append):
        assert run.lock_holder()["pid"] == os.getpid()
    assert len(notices) == 1 and f"pid {pid}" in notices[0] and "no longer running" in notices[0]
    assert not run.lock_file.exists()


@pytest.mark.parametrize("content", ["", "{\"pid\": "])
def test_an_empty_or_damaged_lock_is_stale(tmp_path, content, monkeypatch):
    monkeypatch.setattr("gohgraph.training.run_dir._LOCK_WRITE_GRACE_S", 0.1)
    run, notices = RunDir(tmp_path), []
    run.lock_file.write_text(content)
    with run.lock(notice=notices.append):
        assert run.lock_holder()["pid"] == os.getpid()
    assert len(notices) == 1 and "empty or damaged" in notices[0]


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    run = RunDir(tmp_path)
    plant_lock(run, dead_pid(), host="elsewhere.example")
    with pytest.raises(RunDirLockedError, match="on host elsewhere.example.*delete that file"):
        with run.lock():
            pass
    assert run.lock_file.exists()


def test_a_recycled_pid_does_not_keep_a_lock(tmp_path, other_process):
    run, notices = RunDir(tmp_path), []
    holder = plant_lock(run, other_process.pid)
    run.lock_file.write_text(json.dumps({**holder, "process_start": -1}))  # not when that pid's process started
    with run.lock(notice=notices.append):
        pass
    assert len(notices) == 1 and "belongs to another process" in notices[0]


def test_remove_stale_staging_leaves_the_lock_and_the_run(tmp_path):
    run = RunDir(tmp_path)
    run.checkpoint_dir(2).mkdir(parents=True)
    staging = run.checkpoints_dir / ".step_000004.abc123"
    staging.mkdir()
    temp = run.path / ".metrics.json.xyz.tmp"
    temp.write_text("")
    with run.lock():
        assert sorted(run.remove_stale_staging()) == sorted([staging, temp])
        assert run.lock_file.exists() and run.checkpoint_dir(2).is_dir()


def test_the_lock_appears_with_its_content_or_not_at_all(tmp_path):
    """A holder paused right after taking the lock must not look dead: the file is linked into
    place already holding its JSON, and a second create fails."""
    from gohgraph.training.run_dir import _create_with_content

    path = tmp_path / "run.lock"
    _create_with_content(path, '{"pid": 1}\n')
    assert path.read_text() == '{"pid": 1}\n'
    with pytest.raises(FileExistsError):
        _create_with_content(path, '{"pid": 2}\n')
    assert path.read_text() == '{"pid": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]  # no private file left behind
