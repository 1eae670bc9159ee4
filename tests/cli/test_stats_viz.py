"""``gohgraph stats`` and ``gohgraph viz`` on a tiny checkpoint and a small text file."""

import json
import subprocess
import sys

import matplotlib.image as mpimg
import networkx as nx
import numpy as np
import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.analysis.logit_lens import collect_logit_lens
from gohgraph.analysis.stats.collect import collect_routing_stats
from gohgraph.cli.main import main
from gohgraph.data.batches import eval_batches
from gohgraph.data.corpus import load_corpus
from gohgraph.data.tokenizers import ByteTokenizer

CFG = GoHConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2,
                router="graph", router_rounds=1, max_seq_len=64)
TEXT = "".join(f"def function_{i}(x, y):\n    return x * {i} + y  # line {i}\n" for i in range(120))


@pytest.fixture()
def run_dir(tmp_path, monkeypatch):
    """runs/demo with metrics.csv, a step checkpoint and a final model; data.txt beside it."""
    monkeypatch.setenv("GOHGRAPH_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    run = tmp_path / "runs" / "demo"
    model = GoHTransformer(CFG)
    model.save_pretrained(run / "checkpoints" / "step_000010")
    model.save_pretrained(run / "final")
    (run / "metrics.csv").write_text("step,loss,lm_loss,aux_loss,val_loss,head_load_cv\n"
                                     "0,5.6,5.5,0.02,5.6,0.4\n10,4.1,4.0,0.01,,0.3\n", encoding="utf-8")
    (tmp_path / "data.txt").write_text(TEXT, encoding="utf-8")
    return run


def run_cli(*argv):
    return main([str(arg) for arg in argv])


def test_stats_command_matches_the_library_on_the_same_batches(run_dir, tmp_path, capsys):
    data, out = tmp_path / "data.txt", tmp_path / "stats.json"
    code = run_cli("stats", "--checkpoint", run_dir / "final", "--data", data, "--batches", 2,
                   "--batch-size", 2, "--seq-len", 16, "--out", out, "--csv", tmp_path / "stats.csv",
                   "--no-progress")
    assert code == 0
    report = json.loads(out.read_text())
    assert report["tokens"] == 2 * 2 * 16 and report["batches"] == 2

    model = GoHTransformer.from_pretrained(run_dir / "final")
    batches = list(eval_batches(load_corpus(str(data)).val, 2, 16, max_batches=2))
    expected = json.loads(json.dumps(collect_routing_stats(model, batches, progress=False).report()))
    lens = report.pop("logit_lens")  # per layer and head, the top tokens (tests/analysis/test_logit_lens.py)
    assert report == expected
    assert lens == json.loads(json.dumps(collect_logit_lens(model, batches, top_k=10, tokenizer=ByteTokenizer())))
    assert sorted(lens) == ["0", "1"] and all(len(heads) == CFG.n_heads for heads in lens.values())
    assert len(lens["0"]["0"]) == 10 and len(lens["0"]["0"][0]) == 3  # the shared head: [id, score, text]
    assert report["layers"][0]["heads"]["activation_frequency"][0] == 1.0  # the shared head
    assert "experts" not in report["layers"][0]
    assert (tmp_path / "stats.csv").read_text().startswith("layer,group,item,metric,value")
    printed = capsys.readouterr().out
    assert "layer 1:" in printed and f"wrote {out}" in printed


def test_stats_command_reports_drift_against_another_checkpoint(run_dir, tmp_path):
    other = tmp_path / "other"
    torch.manual_seed(1)
    GoHTransformer(CFG).save_pretrained(other)
    out = tmp_path / "stats.json"
    assert run_cli("stats", "--checkpoint", run_dir / "final", "--data", tmp_path / "data.txt", "--batches", 1,
                   "--batch-size", 2, "--seq-len", 16, "--out", out, "--compare", other, "--no-progress") == 0
    drift = json.loads(out.read_text())["drift"]
    assert drift["tokens"] == 32 and 0.0 <= drift["token_drift"] <= 1.0
    assert run_cli("stats", "--checkpoint", run_dir / "final", "--data", tmp_path / "data.txt", "--batches", 1,
                   "--batch-size", 2, "--seq-len", 16, "--out", out, "--compare", run_dir / "final",
                   "--no-progress", "--overwrite") == 0
    assert json.loads(out.read_text())["drift"]["token_drift"] == 0.0  # a checkpoint against itself


def test_viz_command_writes_every_picture_and_finds_the_metrics(run_dir, tmp_path, capsys):
    out = tmp_path / "pictures"
    code = run_cli("viz", "--checkpoint", run_dir / "checkpoints" / "step_000010", "--out", out,
                   "--data", tmp_path / "data.txt", "--batches", 1, "--batch-size", 2, "--seq-len", 16,
                   "--text", "def f(x):", "--no-progress")
    assert code == 0
    names = sorted(path.name for path in out.iterdir())
    assert names == ["cross_layer.png", "head_coactivation.png", "head_load_heatmap.png", "load_percentiles.png",
                     "routing_graph.graphml", "routing_graphs.png", "stats.json", "token_trace.png",
                     "training_curves.png"]  # metrics.csv found two levels up
    for name in names:
        if name.endswith(".png"):
            image = mpimg.imread(out / name)
            assert image.shape[0] > 100 and image.shape[1] > 100
            assert np.unique(image[..., :3].reshape(-1, 3), axis=0).shape[0] > 10
    graph = nx.read_graphml(out / "routing_graph.graphml")
    assert graph.number_of_nodes() == CFG.n_layers * CFG.n_heads
    assert graph.number_of_edges() == CFG.n_layers * CFG.n_heads * (CFG.n_heads - 1)  # complete head graph
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["stats", "viz"])
def test_missing_and_foreign_directories_fail_with_one_line(command, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a checkpoint")
    for checkpoint in (tmp_path / "missing", foreign):
        assert run_cli(command, "--checkpoint", checkpoint, "--out", tmp_path / "out") == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"gohgraph {command}: error:")
        assert str(checkpoint) in err and "Traceback" not in err


def test_bad_numbers_fail_with_the_option_name(run_dir, tmp_path, capsys):
    assert run_cli("stats", "--checkpoint", run_dir / "final", "--out", tmp_path / "s.json",
                   "--data", tmp_path / "data.txt", "--seq-len", 500) == 1
    assert "--seq-len=500 must be in [1, max_seq_len=64]" in capsys.readouterr().err
    assert run_cli("stats", "--checkpoint", run_dir / "final", "--out", tmp_path / "s.json",
                   "--data", tmp_path / "data.txt", "--batches", 0) == 1
    assert "--batches=0" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter importing torch: ~10 s on a busy 2-core machine
def test_console_command_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gohgraph", "stats", "--checkpoint", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "s.json")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


def test_viz_command_traces_the_validation_text_by_default(run_dir, tmp_path, capsys):
    out = tmp_path / "pictures"
    assert run_cli("viz", "--checkpoint", run_dir / "final", "--out", out, "--data", tmp_path / "data.txt",
                   "--batches", 1, "--batch-size", 1, "--seq-len", 16, "--no-progress") == 0
    assert (out / "token_trace.png").is_file() and (out / "training_curves.png").is_file()  # metrics one level up
    report = json.loads((out / "stats.json").read_text())
    assert report["tokens"] == 16


def test_a_saved_bpe_tokenizer_encodes_the_validation_text(run_dir, tmp_path):
    from argparse import Namespace

    from gohgraph.cli.common import validation_batches

    pytest.importorskip("tokenizers")  # the optional BPE dependency
    data = tmp_path / "data.txt"
    bpe_corpus = load_corpus(str(data), tokenizer="bpe:300")
    checkpoint = tmp_path / "bpe_run" / "final"
    model = GoHTransformer(CFG.replace(vocab_size=300))
    model.save_pretrained(checkpoint)
    bpe_corpus.save_tokenizer(checkpoint.parent)  # the trainer saves it in the run directory
    args = Namespace(checkpoint=str(checkpoint), data=str(data), batches=2, batch_size=2, seq_len=16)
    batches, tokenizer = validation_batches(args, model, checkpoint)
    ids = torch.cat([batch.reshape(-1) for batch in batches]).tolist()
    assert len(ids) == 2 * 2 * 16 and max(ids) >= 256  # merged tokens, not bytes
    byte_val_text = load_corpus(str(data)).decode(load_corpus(str(data)).val.tolist())
    assert byte_val_text.startswith(tokenizer.decode(ids))


def test_stats_on_a_run_with_kept_checkpoints_reports_router_saturation(tmp_path, capsys):
    """Two kept steps and final/ (= step 20): step 20 is exactly 1, step 10 (its last layer's head router
    changed) what the library measures on the same batches; the picture is written beside the JSON."""
    from gohgraph.analysis.saturation import routing_saturation
    from gohgraph.training.run_dir import RunDir

    torch.manual_seed(0)
    run = RunDir(tmp_path / "run")
    final = GoHTransformer(CFG)
    early = GoHTransformer(CFG)
    early.load_state_dict(final.state_dict())
    with torch.no_grad():  # the graph router's head embeddings of heads 1 and 2 exchanged
        head_embedding = early.blocks[1].attn.head_routing.router.head_embedding
        head_embedding[[1, 2]] = head_embedding[[2, 1]].clone()
    early.save_pretrained(run.checkpoint_dir(10))
    final.save_pretrained(run.checkpoint_dir(20))
    final.save_pretrained(run.final_dir)
    run.train_config_file.write_text("{}\n", encoding="utf-8")
    (tmp_path / "data.txt").write_text(TEXT, encoding="utf-8")
    out = tmp_path / "stats.json"
    assert run_cli("stats", "--checkpoint", run.path, "--data", tmp_path / "data.txt", "--batches", 2,
                   "--batch-size", 2, "--seq-len", 16, "--out", out, "--no-progress") == 0
    saturation = json.loads(out.read_text())["saturation"]
    assert [entry["step"] for entry in saturation["checkpoints"]] == [10, 20]
    assert saturation["checkpoints"][1]["heads"] == 1.0
    batches = list(eval_batches(load_corpus(str(tmp_path / "data.txt")).val, 2, 16, max_batches=2))
    expected = routing_saturation([(10, early)], final, batches)["checkpoints"][0]
    assert saturation["checkpoints"][0]["layers"] == expected["layers"]
    assert saturation["checkpoints"][0]["layers"][1]["heads"] < 1.0  # the swapped heads changed choices
    picture = tmp_path / "stats_saturation.png"
    assert mpimg.imread(picture).shape[0] > 100
    assert "router saturation vs the newest model: step 10 heads" in capsys.readouterr().out
    out.unlink()  # the picture left from the first run is not overwritten without --overwrite
    assert run_cli("stats", "--checkpoint", run.path, "--data", tmp_path / "data.txt", "--batches", 1,
                   "--batch-size", 2, "--seq-len", 16, "--out", out, "--no-progress") == 1
    assert "stats_saturation.png already exists; pass --overwrite" in capsys.readouterr().err


def test_stats_of_an_expert_model_lists_the_expert_lens_vocabulary_and_coactivation(tmp_path):
    from gohgraph.analysis.logit_lens import collect_expert_logit_lens

    torch.manual_seed(0)
    cfg = GoHConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2,
                    router="linear", max_seq_len=64, ffn="mh-moe", n_experts=5, n_shared_experts=1, n_subtokens=2,
                    top_k_experts=2)
    GoHTransformer(cfg).save_pretrained(tmp_path / "model")
    (tmp_path / "data.txt").write_text(TEXT, encoding="utf-8")
    out, table = tmp_path / "stats.json", tmp_path / "stats.csv"
    assert run_cli("stats", "--checkpoint", tmp_path / "model", "--data", tmp_path / "data.txt", "--batches", 1,
                   "--batch-size", 2, "--seq-len", 16, "--out", out, "--csv", table, "--no-progress") == 0
    report = json.loads(out.read_text())
    model = GoHTransformer.from_pretrained(tmp_path / "model")
    batches = list(eval_batches(load_corpus(str(tmp_path / "data.txt")).val, 2, 16, max_batches=1))
    expected = collect_expert_logit_lens(model, batches, top_k=10, tokenizer=ByteTokenizer())
    assert report["expert_logit_lens"] == json.loads(json.dumps(expected))
    assert sorted(report["expert_logit_lens"]["1"]) == ["0", "1", "2", "3"]  # the routed experts
    assert "saturation" not in report  # a lone model: no run, no checkpoints to compare
    layer = report["layers"][1]
    assert len(layer["experts"]["coactivation_given"]) == 4 and layer["experts"]["coactivation_given"][0][0] in (1.0, None)
    vocabulary = report["vocabulary"]["layers"][1]
    assert set(vocabulary) == {"layer", "heads", "experts"} and set(vocabulary["experts"]) == {"input", "predicted"}
    assert sum(vocabulary["heads"]["input"]["by_token"]["occurrences"]) == 2 * 16
    assert "vocab_experts_predicted" in table.read_text()
