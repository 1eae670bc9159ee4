"""``gohgraph train --data NAME=PATH[:WEIGHT]`` repeated, then ``eval`` and the training curves of that run."""

import json

import pytest

from gohgraph import viz
from gohgraph.cli.main import main
from gohgraph.data.corpus import load_corpus
from gohgraph.models.pretrained import from_pretrained
from gohgraph.training.metrics import read_metrics_columns
from gohgraph.training.trainer import evaluate

RUN = ["--batch-size", "2", "--seq-len", "16", "--no-progress", "--device", "cpu", "--max-steps", "2",
       "--eval-every", "2", "--set", "d_model=32", "--set", "n_layers=1", "--set", "eval_batches=2",
       "--set", "tensorboard=false"]


@pytest.fixture
def two_sources(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    for i in range(6):
        (code / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x * {j}\n" for j in range(30)))
    prose = tmp_path / "prose.txt"
    prose.write_text("The quick brown fox jumps over the lazy dog. " * 120)
    return code, prose


@pytest.mark.slow
def test_train_on_two_sources_then_eval_each(tmp_path, two_sources, capsys):
    code, prose = two_sources
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["train", *RUN, "--run-dir", str(run), "--cache-dir", str(cache),
                 "--data", f"code={code}:1", "--data", f"prose={prose}:3"]) == 0
    printed = capsys.readouterr().out
    assert "code (weight 1, p=0.250)" in printed and "prose (weight 3, p=0.750)" in printed
    settings = json.loads((run / "data.json").read_text())
    assert settings["sources"] == [{"name": "code", "path": str(code), "weight": 1.0},
                                   {"name": "prose", "path": str(prose), "weight": 3.0}]
    columns = read_metrics_columns(run / "metrics.csv")
    model = from_pretrained(run / "final")
    for name, path in (("code", code), ("prose", prose)):
        alone = evaluate(model, load_corpus(str(path), cache).val, 2, 16, 2)
        assert columns[f"val_loss/{name}"][-1] == pytest.approx(alone, rel=1e-5)

    assert main(["eval", "--checkpoint", str(run), "--cache-dir", str(cache), "--json", "--max-batches", "2",
                 "--batch-size", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["loss_by_source"]) == {"code", "prose"}
    alone = evaluate(model, load_corpus(str(prose), cache).val, 2, 16, 2)
    assert result["loss_by_source"]["prose"] == pytest.approx(alone, rel=1e-6)

    figure = viz.training_curves(run / "metrics.csv")
    titles = [ax.get_title() for ax in figure.axes]
    assert "validation loss per source (nats/token)" in titles
    panel = figure.axes[titles.index("validation loss per source (nats/token)")]
    assert sorted(line.get_label() for line in panel.get_lines()) == ["val_loss/code", "val_loss/prose"]


def test_bad_source_flags_are_one_line_errors(tmp_path, two_sources, capsys):
    code, _ = two_sources
    assert main(["train", *RUN, "--run-dir", str(tmp_path / "r"), "--data", f"code={code}:zero"]) == 1
    # "zero" after the path's last ':' is meant as a weight (no such path holds it), and is not a number
    assert "weight 'zero' is not a number" in capsys.readouterr().err
    assert main(["train", *RUN, "--run-dir", str(tmp_path / "r"), "--data", f"a={code}:-2"]) == 1
    assert "must be a finite number > 0" in capsys.readouterr().err
    assert main(["train", *RUN, "--run-dir", str(tmp_path / "r"), "--data", f"a={code}",
                 "--data", f"a={code}"]) == 1
    assert "more than once" in capsys.readouterr().err


def test_stats_by_source_reports_each_source(tmp_path, two_sources, capsys):
    from gohgraph import GoHConfig, GoHTransformer
    from gohgraph.analysis.stats.collect import routing_by_source
    from gohgraph.data.batches import eval_batches

    code, prose = two_sources
    cfg = GoHConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2,
                    router="graph", router_rounds=1, ffn="moe", n_experts=4, top_k_experts=2)
    model = GoHTransformer(cfg)
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "stats.json"
    assert main(["stats", "--checkpoint", str(tmp_path / "model"), "--out", str(out), "--by-source",
                 "--data", f"code={code}", "--data", f"prose={prose}", "--batches", "2", "--batch-size", "2",
                 "--seq-len", "16", "--no-progress", "--csv", str(tmp_path / "stats.csv")]) == 0
    printed = capsys.readouterr().out
    assert "tokens per source: code 64, prose 64" in printed
    assert "most specialised expert per source" in printed
    report = json.loads(out.read_text())
    batches = {name: list(eval_batches(load_corpus(str(path)).val, 2, 16, 2))
               for name, path in (("code", code), ("prose", prose))}
    expected = routing_by_source(model, batches)
    assert report["by_source"]["layers"][1]["experts"]["assignment_count"] == \
        expected["layers"][1]["experts"]["assignment_count"]
    assert report["tokens"] == 128 and len(report["cross_layer"]) == 1

    assert main(["stats", "--checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "s2.json"),
                 "--by-source", "--no-progress"]) == 1
    assert "routing by source needs named sources" in capsys.readouterr().err
