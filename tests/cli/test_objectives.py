"""``gohgraph train --objective mlm|classify`` and ``gohgraph eval`` of those runs, end to end (tiny)."""

import json

from gohgraph import GoHEncoder, from_pretrained
from gohgraph.cli.main import main


def test_train_mlm_then_eval(tmp_path, capsys):
    run_dir = tmp_path / "mlm"
    code = main(["train", "--objective", "mlm", "--run-dir", str(run_dir), "--max-steps", "3", "--seq-len", "32",
                 "--batch-size", "4", "--eval-every", "2", "--set", "d_model=32", "--set", "eval_batches=2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "validation MLM loss" in printed and "unigram entropy" in printed
    model = from_pretrained(run_dir / "final")
    assert isinstance(model, GoHEncoder) and model.config.vocab_size == 259
    history = json.loads((run_dir / "metrics.json").read_text())
    assert history[-1]["step"] == 3 and history[-1]["loss"] > 0
    assert main(["eval", "--checkpoint", str(run_dir), "--json", "--max-batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["objective"] == "mlm" and result["loss"] > 0


def test_train_classify_reports_accuracy(tmp_path, capsys):
    run_dir = tmp_path / "cls"
    code = main(["train", "--objective", "classify", "--run-dir", str(run_dir), "--max-steps", "2", "--seq-len",
                 "32", "--batch-size", "4", "--set", "d_model=32", "--set", "n_labels=3", "--set", "eval_batches=2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "validation accuracy" in printed and "majority class" in printed
    history = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= history[-1]["accuracy"] <= 1
