"""Small shared settings of the tests: a tiny graph-routed model, a learnable synthetic corpus, and a
Ctrl-C driver for training commands."""

import os
import signal
import subprocess
import time

import numpy as np

from gohgraph.data.corpus import Corpus
from gohgraph.data.tokenizers import ByteTokenizer

TINY = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2,
            router="graph", router_rounds=1, router_dim=8, max_seq_len=33, aux_free_bias=True,
            bias_update_rate=0.01)


def make_corpus(n_train=20_000, n_val=2_000, seed=0):
    """Token streams with structure a small model can learn: a repeating phrase plus noise."""
    rng = np.random.default_rng(seed)
    phrase = np.frombuffer(b"def f(x):\n    return x + 1\n", dtype=np.uint8)
    def stream(n):
        tokens = np.resize(phrase, n).astype(np.uint16)
        noise = rng.random(n) < 0.05
        tokens[noise] = rng.integers(0, 256, noise.sum())
        return tokens
    return Corpus(train=stream(n_train), val=stream(n_val), vocab_size=256, source="synthetic",
                  tokenizer=ByteTokenizer())


def ctrl_c_after_logged_steps(command, metrics_csv, steps=3, timeout=120):
    """Run ``command`` (a training CLI), send it one SIGINT once ``metrics_csv`` holds ``steps`` rows,
    and return ``(returncode, stdout, stderr)``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if metrics_csv.is_file() and len(metrics_csv.read_text().splitlines()) >= steps + 1:  # + the header
            break
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr
