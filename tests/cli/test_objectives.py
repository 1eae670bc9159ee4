"""``gohgraph train --objective mlm|classify`` and ``gohgraph eval`` of those runs, end to end (tiny)."""

import json

from gohgraph import GoHEncoder, from_pretrained
from gohgraph.cli.main import main
from gohgraph.training.config import TrainConfig


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


def test_train_classify_on_a_labelled_file_then_eval_reads_it_again(tmp_path, capsys):
    lines = [f"{'loud' if i % 2 else 'quiet'}\t{('HELLO THERE' if i % 2 else 'hello there')} {i}" for i in range(40)]
    data = tmp_path / "labelled.tsv"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run_dir = tmp_path / "cls"
    code = main(["train", "--objective", "classify", "--data", str(data), "--run-dir", str(run_dir), "--max-steps",
                 "2", "--seq-len", "24", "--batch-size", "4", "--set", "d_model=32", "--set", "eval_batches=2"])
    assert code == 0
    assert "2 classes (loud, quiet)" in capsys.readouterr().out  # the file's labels, not the preset's 8
    model = from_pretrained(run_dir / "final")
    assert model.config.n_labels == 2
    settings = json.loads((run_dir / "objective.json").read_text())
    assert settings["data"] == str(data) and settings["labels"] == ["loud", "quiet"]
    assert main(["eval", "--checkpoint", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["objective"] == "classify" and result["examples"] == 4  # the file's last tenth


def test_objective_data_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("quiet\thello\nno tab\n", encoding="utf-8")
    code = main(["train", "--objective", "classify", "--data", str(bad), "--run-dir", str(tmp_path / "r"),
                 "--max-steps", "1", "--seq-len", "16", "--set", "d_model=32"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "bad.tsv:2: expected 'label<TAB>text', found no tab" in err and "\n" not in err
    code = main(["train", "--objective", "mlm", "--data", f"a={bad}", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "reads one --data path" in err


def test_the_loops_flags_are_applied_to_an_mlm_run_or_refused_in_one_line(tmp_path, capsys):
    run_dir = tmp_path / "mlm"
    base = ["train", "--objective", "mlm", "--run-dir", str(run_dir), "--seq-len", "16", "--batch-size", "2",
            "--set", "d_model=32", "--set", "eval_batches=1", "--no-progress"]
    assert main([*base, "--max-steps", "2", "--grad-accum", "2", "--dtype", "bfloat16", "--set",
                 "aux_warmup_steps=2"]) == 0
    saved = TrainConfig.from_dict(json.loads((run_dir / "train_config.json").read_text()))
    assert (saved.grad_accum_steps, saved.dtype, saved.aux_warmup_steps) == (2, "bfloat16", 2)
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[1].split(",")[rows[0].split(",").index("aux_scale")] == "0"  # the routing-loss warm-up applies
    capsys.readouterr()
    for flags, named in ((["--tensor-parallel", "2"], "tensor parallelism shards decoder models"),
                         (["--set", "recursion_warmup_steps=2"], "only decoders recurse")):
        assert main([*base, "--max-steps", "2", "--overwrite", *flags]) == 1
        err = capsys.readouterr().err.strip()
        assert named in err and "\n" not in err, err
    run_dir = tmp_path / "mlm2"
    base[base.index(str(tmp_path / "mlm"))] = str(run_dir)
    # --save-every applies: checkpoints at steps 2 and 4 (and the last)
    assert main([*base, "--max-steps", "5", "--save-every", "2"]) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest", "step_000002", "step_000004", "step_000005"]


def test_eval_of_an_objective_run_refuses_what_it_cannot_do(tmp_path, capsys):
    run_dir = tmp_path / "mlm"
    assert main(["train", "--objective", "mlm", "--run-dir", str(run_dir), "--max-steps", "1", "--seq-len", "16",
                 "--batch-size", "2", "--set", "d_model=32", "--set", "eval_batches=1", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run_dir), "--split", "train"]) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("checkpoint: ")]
    assert len(err) == 1 and "scored on its validation split" in err[0], err
