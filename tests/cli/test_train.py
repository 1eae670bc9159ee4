"""``gohgraph train / eval / generate``: configs from presets, files and flags; errors; the tiny preset."""

import json
import math

import pytest
import torch

from gohgraph import GoHTransformer
from gohgraph.cli.main import build_parser, main
from gohgraph.cli.train import build_configs as build_task_configs
from gohgraph.data.corpus import load_corpus
from gohgraph.training.metrics import read_metrics
from gohgraph.training.presets import PRESETS, get_preset
from gohgraph.training.tasks import get_task
from gohgraph.training.trainer import evaluate

SMALL_RUN = ["--batch-size", "2", "--seq-len", "16", "--no-progress", "--device", "cpu",
             "--set", "d_model=32", "--set", "n_layers=1", "--set", "eval_batches=2"]


def build_configs(args, run_dir):
    return build_task_configs(args, run_dir, get_task("lm"))


def _args(*argv):
    return build_parser().parse_args(["train", *argv])


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i} + 1\n\n" for i in range(200)))
    return path


def test_presets_are_graph_routed_and_valid():
    from gohgraph import GoHConfig
    from gohgraph.training.config import TrainConfig

    for name in PRESETS:
        model_kwargs, train_kwargs = get_preset(name)
        cfg, tc = GoHConfig(**model_kwargs), TrainConfig(**train_kwargs)
        assert cfg.router == "graph" and cfg.inter_head_flow and cfg.n_shared_heads > 0
        assert cfg.top_k_heads < cfg.n_routed_heads and cfg.max_seq_len >= tc.seq_len + 1
    with pytest.raises(ValueError, match="preset='huge' is not one of"):
        get_preset("huge")


def test_config_precedence_preset_then_file_then_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("preset: small\nmodel:\n  n_layers: 3\nlr: 0.002\nmax_steps: 77\n")
    cfg, tc, data = build_configs(_args("--config", str(config), "--max-steps", "5", "--set", "d_model=128",
                                        "--router", "linear"), tmp_path / "run")
    small_model, small_train = get_preset("small")
    assert (cfg.n_layers, cfg.d_model, cfg.router, cfg.n_heads) == (3, 128, "linear", small_model["n_heads"])
    assert (tc.lr, tc.max_steps, tc.seq_len) == (0.002, 5, small_train["seq_len"])
    assert data == {"data": None, "tokenizer": "byte"}

    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"train": {"batch_size": 3}, "router": "dense"}))
    cfg, tc, _ = build_configs(_args("--config", str(as_json)), tmp_path / "run")
    assert (tc.batch_size, cfg.router, cfg.d_model) == (3, "dense", get_preset("tiny")[0]["d_model"])

    as_json.write_text(json.dumps({"d_modle": 3}))
    with pytest.raises(ValueError, match="unknown field 'd_modle'"):
        build_configs(_args("--config", str(as_json)), tmp_path / "run")
    with pytest.raises(ValueError, match="TrainConfig.max_steps=0 must be a positive integer"):
        build_configs(_args("--max-steps", "0"), tmp_path / "run")


def test_set_makes_the_recursion_router_a_graph_router(tmp_path):
    cfg, _, _ = build_configs(_args("--set", "recursion=mor", "--set", "recursion_scorer=graph",
                                    "--set", "recursion_router=token-choice"), tmp_path / "run")
    assert (cfg.recursion, cfg.recursion_scorer, cfg.recursion_router) == ("mor", "graph", "token-choice")
    assert GoHTransformer(cfg).recursion.router.graph_scorer is not None


def test_user_errors_are_one_line(tmp_path, text_file, capsys):
    cases = [
        (["--data", str(tmp_path / "missing.txt")], "missing.txt"),
        (["--config", str(tmp_path / "nope.yaml")], "nope.yaml does not exist"),
        (["--set", "router=attention"], "router='attention' is not one of"),
        (["--set", "recursion=mor", "--set", "recursion_scorer=gnn"], "recursion_scorer='gnn' is not one of"),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        assert main(["train", "--run-dir", str(tmp_path / "r"), *argv]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("gohgraph train: error:") and expected in err[0], err


def test_train_resume_eval_and_generate(tmp_path, text_file, capsys):
    run_dir = tmp_path / "run"
    base = ["train", "--data", str(text_file), "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(run_dir),
            *SMALL_RUN]
    assert main([*base, "--max-steps", "4", "--eval-every", "2", "--save-every", "2"]) == 0
    assert "final model:" in capsys.readouterr().out
    # a second run into the same directory must choose: resume, overwrite or another name
    assert main([*base, "--max-steps", "4"]) == 1
    assert "already holds a trained model or checkpoints; pass --resume" in capsys.readouterr().err
    # resume: configs come from the run, --max-steps extends it
    assert main(["train", "--run-dir", str(run_dir), "--resume", "--max-steps", "6", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    steps = [int(row["step"]) for row in read_metrics(run_dir / "metrics.csv")]
    assert steps == sorted(steps) and steps[-1] == 6 and steps.count(4) == 1

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run_dir), "--json", "--cache-dir", str(tmp_path / "cache"),
                 "--max-batches", "3"]) == 0
    reported = json.loads(capsys.readouterr().out)
    model = GoHTransformer.from_pretrained(run_dir / "final")
    corpus = load_corpus(str(text_file), cache_dir=tmp_path / "cache")
    expected = evaluate(model, corpus.val, 8, 16, 3)  # eval reads seq_len=16 from the run
    assert reported["loss"] == pytest.approx(expected, rel=1e-6)
    assert reported["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)

    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "def f", "--max-new-tokens", "12",
                 "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    greedy = model.generate(torch.tensor([list(b"def f")]), max_new_tokens=12, temperature=0)
    assert printed == bytes(greedy[0].tolist()).decode("utf-8", errors="replace") + "\n"


@pytest.mark.slow
def test_tiny_preset_learns_the_default_corpus_in_50_steps(tmp_path, capsys):
    torch.set_num_threads(2)
    run_dir = tmp_path / "tiny"
    assert main(["train", "--preset", "tiny", "--max-steps", "50", "--run-dir", str(run_dir),
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"]) == 0
    validation = [row["val_loss"] for row in read_metrics(run_dir / "metrics.csv") if "val_loss" in row]
    assert len(validation) == 2 and validation[-1] < validation[0]
    assert validation[-1] < math.log(256) - 2.0  # "well below" ln 256 = 5.55 nats: under 3.55
    out = capsys.readouterr().out
    assert "standard library" in out and "router=graph" in out
