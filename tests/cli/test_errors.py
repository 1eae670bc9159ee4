"""Every mistake a user of the command line can make ends in one line on stderr, never a traceback,
and loses nothing (docs/contract.md). Most cases call the CLI's ``main`` in this process (an exception
escaping it would fail the test, as a traceback would reach the user); a few run it in a fresh
interpreter, as ``python -m gohgraph`` and the example script."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gohgraph import __version__
from gohgraph.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
TEXT = "".join(f"def function_{i}(x, y):\n    return x * {i} + y  # line {i}\n" for i in range(150))
SMALL = ["--batch-size", "2", "--seq-len", "16", "--no-progress", "--device", "cpu", "--eval-every", "1",
         "--save-every", "1", "--set", "eval_batches=1", "--set", "tensorboard=false"]
UNWRITABLE = "/sys/gohgraph-cannot-write-here"  # refused even to root (sysfs)
# a CUDA device this machine cannot run on: plain cuda without a GPU, one past the last GPU with one
# (both are refused by the same check, in one line that starts "--device cuda")
NO_SUCH_CUDA = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A data file, a finished two-step run and a cache, shared by the cases (built in-process)."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "code.txt"
    data.write_text(TEXT, encoding="utf-8")
    env_cache = os.environ.get("GOHGRAPH_CACHE")
    os.environ["GOHGRAPH_CACHE"] = str(root / "cache")
    try:
        assert main(["train", "--run-dir", str(root / "run"), "--data", str(data), "--max-steps", "2",
                     "--set", "d_model=32", "--set", "n_heads=4", *SMALL]) == 0
    finally:
        if env_cache is None:
            os.environ.pop("GOHGRAPH_CACHE")
        else:
            os.environ["GOHGRAPH_CACHE"] = env_cache
    return root


def run(workspace, *argv, script=None, subprocess_run=False):
    """The CLI's exit code, stdout and stderr; in a fresh interpreter for a script or when asked."""
    if script is None and not subprocess_run:
        out, err = io.StringIO(), io.StringIO()
        previous = os.environ.get("GOHGRAPH_CACHE")
        os.environ["GOHGRAPH_CACHE"] = str(workspace / "cache")
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([str(arg) for arg in argv])
        finally:
            os.environ.pop("GOHGRAPH_CACHE") if previous is None else os.environ.update(GOHGRAPH_CACHE=previous)
        return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    env = {**os.environ, "GOHGRAPH_CACHE": str(workspace / "cache"), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(script)] if script else [sys.executable, "-m", "gohgraph"]
    done = subprocess.run([*command, *argv], capture_output=True, text=True, env=env, timeout=300,
                          cwd=workspace)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def assert_one_line_error(done, *fragments):
    assert done.returncode == 1, (done.returncode, done.stdout[-500:], done.stderr)
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def train_args(workspace, name, *extra):
    return ["train", "--run-dir", str(workspace / name), "--data", str(workspace / "code.txt"), "--max-steps", "1",
            "--set", "d_model=32", "--set", "n_heads=4", *SMALL, *extra]


@pytest.mark.parametrize("extra,fragments", [
    (["--set", "inter_head_flow=maybe"], ["inter_head_flow='maybe' must be True or False"]),
    (["--set", "inter_head_flow=no"], ["inter_head_flow='no'"]),
    (["--set", "top_k_heads=2.5"], ["top_k_heads='2.5' must be an integer"]),
    (["--set", "vocab_size=10"], ["vocab_size=10 is smaller than the data's tokenizer (256 tokens)"]),
    (["--set", "max_seq_len=8"], ["seq_len=16 needs max_seq_len >= 17"]),
    (["--seq-len", "100000", "--batch-size", "64"], ["a training step needs about", "GiB", "--force"]),
    (["--set", "heads=4"], ["'heads' is not a field"]),
    (["--device", NO_SUCH_CUDA], [f"--device {NO_SUCH_CUDA}"]),
    (["--resume"], ["nothing to resume"]),
])
def test_bad_training_requests_are_one_line_errors(workspace, extra, fragments):
    name = "bad-" + str(abs(hash(tuple(extra))))
    done = run(workspace, *train_args(workspace, name, *extra))
    assert_one_line_error(done, *fragments)
    assert not (workspace / name / "checkpoints").exists()


def test_config_file_values_are_parsed_strictly(workspace):
    config = workspace / "config.json"
    config.write_text(json.dumps({"dropout": "0.1", "inter_head_flow": "false"}), encoding="utf-8")
    done = run(workspace, *train_args(workspace, "from-file", "--config", str(config)))
    assert done.returncode == 0, done.stderr
    saved = json.loads((workspace / "from-file" / "model_config.json").read_text())
    assert saved["dropout"] == 0.1 and saved["inter_head_flow"] is False
    config.write_text(json.dumps({"inter_head_flow": "no"}), encoding="utf-8")
    assert_one_line_error(run(workspace, *train_args(workspace, "from-file-2", "--config", str(config))),
                          "inter_head_flow='no'")


def test_resume_with_nothing_to_resume_keeps_the_saved_configs(workspace):
    run_dir = workspace / "configs-only"
    run_dir.mkdir()
    (run_dir / "train_config.json").write_text('{"lr": 0.5}', encoding="utf-8")
    assert_one_line_error(run(workspace, *train_args(workspace, "configs-only", "--resume")), "nothing to resume")
    assert (run_dir / "train_config.json").read_text(encoding="utf-8") == '{"lr": 0.5}'


def test_unwritable_and_misplaced_outputs(workspace):
    assert_one_line_error(run(workspace, *train_args(workspace, "x")[:1], "--run-dir", UNWRITABLE,
                              *train_args(workspace, "x")[3:]), UNWRITABLE)
    a_file = workspace / "a-file"
    a_file.write_text("x", encoding="utf-8")
    assert_one_line_error(run(workspace, *train_args(workspace, "x")[:1], "--run-dir", str(a_file),
                              *train_args(workspace, "x")[3:]), "is a file")
    assert_one_line_error(run(workspace, "viz", "--checkpoint", str(workspace / "run"), "--out", str(a_file),
                              "--batches", "1", "--batch-size", "1", "--seq-len", "16", "--no-progress"), "is a file")
    assert_one_line_error(run(workspace, "stats", "--checkpoint", str(workspace / "run"), "--out",
                              f"{UNWRITABLE}/stats.json", "--batches", "1", "--no-progress"), UNWRITABLE)


def test_outputs_are_never_overwritten_without_overwrite(workspace):
    out = workspace / "pictures"
    args = ["viz", "--checkpoint", str(workspace / "run"), "--out", str(out), "--batches", "1", "--batch-size", "1",
            "--seq-len", "16", "--no-progress"]
    first = run(workspace, *args)
    assert first.returncode == 0, first.stderr
    assert "checkpoint: " in first.stderr  # says which checkpoint of the run it used
    keep = out / "my-notes.txt"
    keep.write_text("mine", encoding="utf-8")
    assert_one_line_error(run(workspace, *args), "already exists", "--overwrite")
    assert run(workspace, *args, "--overwrite").returncode == 0
    assert keep.read_text(encoding="utf-8") == "mine"  # only the command's own files are replaced
    stats = workspace / "stats.json"
    stats_args = ["stats", "--checkpoint", str(workspace / "run"), "--out", str(stats), "--batches", "1",
                  "--batch-size", "1", "--seq-len", "16", "--no-progress"]
    assert run(workspace, *stats_args).returncode == 0
    assert_one_line_error(run(workspace, *stats_args), "already exists")


@pytest.mark.parametrize("extra,fragments", [
    (["--top-k", "0"], ["top_k=0 must be an integer >= 1"]),
    (["--temperature", "-1"], ["temperature=-1.0 must be a finite number >= 0"]),
    (["--max-new-tokens", "-3"], ["--max-new-tokens=-3 must be >= 1"]),
    (["--prompt", ""], ["--prompt must not be empty"]),
    (["--top-p", "1.5"], ["top_p=1.5"]),
    (["--device", NO_SUCH_CUDA], [f"--device {NO_SUCH_CUDA}"]),
])
def test_bad_generation_requests_are_one_line_errors(workspace, extra, fragments):
    done = run(workspace, "generate", "--checkpoint", str(workspace / "run"), "--max-new-tokens", "4", *extra)
    assert_one_line_error(done, *fragments)


def test_eval_on_a_run_directory_says_which_checkpoint(workspace):
    done = run(workspace, "eval", "--checkpoint", str(workspace / "run"), "--max-batches", "1", "--seq-len", "16",
               "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["checkpoint"] in done.stderr


def test_example_with_binary_data_is_a_one_line_error(workspace):
    done = run(workspace, "--data", "/bin/ls", "--runs", str(workspace / "example-runs"),
               script=ROOT / "examples" / "train_lm.py")
    assert_one_line_error(done, "/bin/ls", "not UTF-8 text")


def test_version_help_and_a_bad_value_in_a_fresh_interpreter(workspace):
    done = run(workspace, "--version", subprocess_run=True)
    assert done.returncode == 0 and done.stdout.strip() == f"gohgraph {__version__}"
    done = run(workspace, "--help", subprocess_run=True)
    assert "Graph-of-Heads" in done.stdout and "train" in done.stdout and "--version" in done.stdout
    assert_one_line_error(run(workspace, *train_args(workspace, "fresh", "--set", "inter_head_flow=maybe"),
                              subprocess_run=True), "inter_head_flow='maybe'")
    assert_one_line_error(run(workspace, "generate", "--checkpoint", workspace / "run", "--device", NO_SUCH_CUDA,
                              subprocess_run=True), f"--device {NO_SUCH_CUDA}")


def test_every_flag_of_every_command_has_help():
    from gohgraph.cli.main import build_parser

    parser = build_parser()
    missing = [f"{name} {action.option_strings}" for group in parser._subparsers._group_actions
               for name, sub in group.choices.items() for action in sub._actions
               if action.option_strings and not action.help]
    assert not missing, missing
