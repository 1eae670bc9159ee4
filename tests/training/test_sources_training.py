"""Training on several sources: a validation loss per source, equal to scoring each source alone."""

import csv

import numpy as np
import pytest

from gohgraph import GoHConfig
from gohgraph.data.corpus import Corpus
from gohgraph.data.sources import MixedCorpus, Source
from gohgraph.data.tokenizers import ByteTokenizer
from gohgraph.training.config import TrainConfig
from gohgraph.training.metrics import COLUMNS
from gohgraph.training.trainer import evaluate, train
from tests.helpers import TINY, make_corpus


def phrase_corpus(phrase: bytes, seed: int) -> Corpus:
    rng = np.random.default_rng(seed)
    tokens = np.resize(np.frombuffer(phrase, dtype=np.uint8), 6_000).astype(np.uint16)
    noise = rng.random(tokens.size) < 0.1
    tokens[noise] = rng.integers(0, 256, noise.sum())
    return Corpus(train=tokens[:5_000], val=tokens[5_000:], vocab_size=256, source=phrase.decode(),
                  tokenizer=ByteTokenizer())


def test_validation_loss_per_source_equals_eval_on_each_source_alone(tmp_path):
    code, prose = phrase_corpus(b"def f(x):\n    return x\n", 1), phrase_corpus(b"The cat sat on a mat. ", 2)
    mixed = MixedCorpus([Source("code", 1.0, code), Source("prose", 3.0, prose)])
    tc = TrainConfig(batch_size=4, seq_len=32, max_steps=6, lr=5e-3, warmup_steps=1, eval_every=3,
                     eval_batches=3, save_every=6, log_every=3, device="cpu", tensorboard=False)
    result = train(GoHConfig(**TINY), tc, mixed, tmp_path, progress=False)

    with open(result.metrics_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    at = COLUMNS.index("val_loss") + 1
    assert list(rows[0]) == COLUMNS[:at] + ["val_loss/code", "val_loss/prose"] + COLUMNS[at:]
    last = rows[-1]
    assert int(last["step"]) == 6
    alone = {name: evaluate(result.model, corpus.val, 4, 32, 3) for name, corpus in (("code", code), ("prose", prose))}
    assert result.val_by_source == pytest.approx(alone, rel=1e-6)
    for name, loss in alone.items():  # the CSV keeps 6 significant digits
        assert float(last[f"val_loss/{name}"]) == pytest.approx(loss, rel=1e-5)
    assert alone["code"] != pytest.approx(alone["prose"], rel=1e-3)  # two sources really differ
    # val_loss is the loss over the union of both sources' windows (equal window counts here)
    assert float(last["val_loss"]) == pytest.approx((alone["code"] + alone["prose"]) / 2, rel=1e-5)
    assert result.val_tokens == 2 * 3 * 4 * 32
    assert [row["val_loss/code"] != "" for row in rows] == [row["val_loss"] != "" for row in rows]


def test_single_corpus_metrics_keep_their_columns(tmp_path):
    tc = TrainConfig(batch_size=4, seq_len=32, max_steps=2, eval_every=2, eval_batches=1, device="cpu",
                     tensorboard=False)
    result = train(GoHConfig(**TINY), tc, make_corpus(n_train=3_000, n_val=500), tmp_path, progress=False)
    with open(result.metrics_path, newline="") as handle:
        assert next(csv.reader(handle)) == COLUMNS
    assert result.val_by_source == {}
