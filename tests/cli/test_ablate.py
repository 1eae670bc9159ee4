"""``gohgraph ablate`` on a tiny graph-routed checkpoint with experts: its three files, and its refusals."""

import csv
import json

import matplotlib.image as mpimg
import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.analysis.ablation import CSV_COLUMNS, evaluate_routing, heads_forced
from gohgraph.cli.common import load_model
from tests.cli.test_bad_input import assert_one_line_error, assert_refused_before_model_work, cli

CFG = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2, router="graph",
           router_rounds=1, router_dim=8, max_seq_len=64, ffn="moe", n_experts=4, top_k_experts=2)
TEXT = "".join(f"def function_{i}(x, y):\n    return x * {i} + y  # line {i}\n" for i in range(120))
ARGS = ("--batches", "1", "--batch-size", "2", "--seq-len", "16", "--no-progress")


@pytest.fixture()
def workspace(tmp_path):
    torch.manual_seed(0)
    GoHTransformer(GoHConfig(**CFG)).save_pretrained(tmp_path / "model")
    (tmp_path / "data.txt").write_text(TEXT, encoding="utf-8")
    return tmp_path


def ablate_cli(workspace, *extra):
    return cli("ablate", "--checkpoint", workspace / "model", "--out", workspace / "out",
               "--data", workspace / "data.txt", *ARGS, *extra)


def test_ablate_writes_json_csv_and_a_heatmap_whose_values_match_the_library(workspace):
    done = ablate_cli(workspace)
    assert done.returncode == 0, done.stderr
    out = workspace / "out"
    report = json.loads((out / "ablation.json").read_text())
    with open(out / "ablation.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == len(report["interventions"])
    kinds = {row["kind"] for row in rows}
    assert kinds == {"head_off", "head_on", "expert_off", "head_k", "expert_k", "messages"}
    assert mpimg.imread(out / "ablation_heatmap.png").shape[0] > 50

    # one knock-out recomputed by hand on the same validation batch the command read
    model, _ = load_model(workspace / "model")
    from gohgraph.data.batches import eval_batches
    from gohgraph.data.corpus import load_corpus

    batches = list(eval_batches(load_corpus(str(workspace / "data.txt")).val, 2, 16, max_batches=1))
    baseline = evaluate_routing(model.eval(), batches).loss
    assert report["baseline_loss"] == pytest.approx(baseline, abs=1e-6)
    with heads_forced(model, 1, off=[2]):
        expected = evaluate_routing(model, batches).loss - baseline
    row = next(r for r in rows if (r["kind"], r["layer"], r["unit"]) == ("head_off", "1", "2"))
    assert float(row["delta_loss"]) == pytest.approx(expected, abs=1e-6)
    assert next(r for r in rows if r["kind"] == "head_k")["layer"] == ""  # every layer at once


def test_ablate_refuses_to_overwrite_without_the_flag(workspace):
    assert ablate_cli(workspace).returncode == 0
    before = (workspace / "out" / "ablation.json").read_text()
    assert_one_line_error(ablate_cli(workspace), "already exists", "--overwrite")
    assert (workspace / "out" / "ablation.json").read_text() == before
    assert ablate_cli(workspace, "--overwrite").returncode == 0


def test_ablate_refuses_a_model_with_nothing_routed_in_one_line(workspace):
    torch.manual_seed(0)
    GoHTransformer(GoHConfig(**{**CFG, "router": "dense", "ffn": "dense"})).save_pretrained(workspace / "model")
    done = ablate_cli(workspace)
    assert_one_line_error(done, "ablate needs routed heads", "router='dense'")
    assert not (workspace / "out" / "ablation.json").exists()


def test_ablate_refuses_an_encoder_before_reading_its_weights(workspace, monkeypatch):
    from gohgraph.models.encoder import GoHEncoder

    GoHEncoder(GoHConfig(**{**CFG, "model_type": "encoder", "position_embedding": "sinusoidal"})).save_pretrained(
        workspace / "encoder")
    assert_refused_before_model_work(monkeypatch)
    done = cli("ablate", "--checkpoint", workspace / "encoder", "--out", workspace / "out", *ARGS)
    assert_one_line_error(done, "model_type='encoder'", "ablated")
