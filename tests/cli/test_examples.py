"""The examples: train_lm.py (the README's main command), train_encoder.py and train_seq2seq.py each train,
then write statistics and pictures."""

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_train_lm_example_writes_checkpoint_stats_and_pictures(tmp_path):
    text = tmp_path / "text.txt"  # a corpus whose validation split is longer than the token trace
    text.write_text("".join(f"def f{i}(x):\n    return x * {i} + 1\n\n" for i in range(400)))
    done = subprocess.run([sys.executable, str(EXAMPLES / "train_lm.py"), "--data", str(text), "--max-steps", "3",
                           "--runs", str(tmp_path / "runs"), "--stats-batches", "2"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "MPLBACKEND": "Agg"})
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "runs" / "tiny"
    assert (run / "final" / "model.safetensors").is_file()
    assert (run / "stats" / "routing_stats.json").is_file()
    assert (run / "pictures" / "token_trace.png").is_file()


def test_train_seq2seq_example_writes_checkpoint_stats_and_pictures(tmp_path):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"add {i} and {i + 1}\tdef add_{i}(x):\n" for i in range(40)))
    run = tmp_path / "seq2seq"
    done = subprocess.run([sys.executable, str(EXAMPLES / "train_seq2seq.py"), "--data", str(pairs), "--max-steps",
                           "2", "--run-dir", str(run), "--stats-batches", "1", "--set", "d_model=32",
                           "--set", "eval_batches=1", "--set", "batch_size=4", "--set", "seq_len=24"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "MPLBACKEND": "Agg"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "final" / "model.safetensors").is_file()
    assert set(json.loads((run / "stats" / "stats.json").read_text())["kinds"]) == {"encoder", "decoder_self", "cross"}
    assert (run / "pictures" / "routing_graphs_cross.png").is_file()
    assert "copy baseline" in done.stdout and str(run / "pictures") in done.stdout


def test_train_encoder_example_pretrains_draws_and_fine_tunes(tmp_path):
    run = tmp_path / "mlm"
    done = subprocess.run([sys.executable, str(EXAMPLES / "train_encoder.py"), "--max-steps", "2", "--classify-steps",
                           "2", "--run-dir", str(run), "--stats-batches", "1", "--set", "d_model=32",
                           "--set", "eval_batches=1", "--set", "batch_size=4", "--set", "seq_len=32"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "final" / "model.safetensors").is_file() and (run / "metrics.csv").is_file()
    assert (run / "stats" / "stats.json").is_file()
    assert (run / "pictures" / "routing_graphs.png").is_file() and (run / "pictures" / "training_curves.png").is_file()
    classifier = json.loads((tmp_path / "mlm-classify" / "final" / "config.json").read_text())
    assert classifier["n_labels"] == 8 and classifier["d_model"] == 32  # the MLM encoder with a package head
    assert "classifier after 2 steps from the MLM encoder: accuracy" in done.stdout
