"""Small shared settings of the tests: a tiny graph-routed model, a learnable synthetic corpus, a
Ctrl-C driver for training commands, a causality check, and planted run-directory locks."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import torch

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


def assert_later_tokens_change_no_earlier_logit(model, vocab_size, seq=12, split=7, seed=5):
    """Causality: changing the tokens from ``split`` on leaves every earlier logit as it was (to 1e-6)
    and does change the later ones."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (2, seq), generator=generator)
    changed = ids.clone()
    changed[:, split:] = torch.randint(0, vocab_size, (2, seq - split), generator=generator)
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(after[:, :split], before[:, :split], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, split:], before[:, split:])


def live_process():
    """A live process that is not this one (its pid holds planted locks); kill it when done."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def dead_pid() -> int:
    """The pid of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def plant_lock(run, pid: int, host: str = None) -> dict:
    """Write ``run``'s (a :class:`~gohgraph.training.run_dir.RunDir`) lock file as a holder with ``pid`` would."""
    holder = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-12-01T00:00:00+0000"}
    run.path.mkdir(parents=True, exist_ok=True)
    run.lock_file.write_text(json.dumps(holder) + "\n")
    return holder


def at_training_forward(monkeypatch, model_class, call: int, before=None, after=None):
    """Patch ``model_class.forward`` so that its ``call``-th training-mode call (evaluation calls
    are not counted) runs ``before()`` first, or returns ``after(out)`` instead of ``out``: a
    Ctrl-C in the middle of a step, a loss turned to NaN."""
    real_forward, calls = model_class.forward, []

    def forward(model, *args, **kwargs):
        hit = model.training and len(calls) + 1 == call
        if model.training:
            calls.append(1)
        if hit and before is not None:
            before()
        out = real_forward(model, *args, **kwargs)
        return after(out) if hit and after is not None else out

    monkeypatch.setattr(model_class, "forward", forward)


def send_ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def nan_loss(field: str):
    """An ``after`` for :func:`at_training_forward`: the output with its ``field`` loss times NaN."""
    def poison(out):
        setattr(out, field, getattr(out, field) * float("nan"))
        return out
    return poison
