"""Encoder objectives: BERT's masking rates, the package-classification data, the unigram entropy."""

import math

import numpy as np
import torch

from gohgraph.data.objectives import SpecialTokens
from gohgraph.data.objectives.classify import stdlib_package_snippets
from gohgraph.data.objectives.mlm import mask_tokens, mlm_train_batch, unigram_entropy


def test_masking_rates_are_bert_s_within_sampling_error():
    n = 100_000
    ids = torch.randint(0, 256, (100, n // 100))
    inputs, labels = mask_tokens(ids, mask_id=256, n_random=256, generator=torch.Generator().manual_seed(0))
    chosen = labels != -100
    def within(observed, p, trials):  # 4 standard errors of a binomial share
        assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / trials), (observed, p)
    n_chosen = int(chosen.sum())
    within(n_chosen / n, 0.15, n)
    masked = inputs[chosen] == 256
    kept = inputs[chosen] == ids[chosen]
    within(float(masked.float().mean()), 0.8, n_chosen)
    # a random replacement equals the original 1/256 of the time: count it as kept, as the 10% "keep"
    within(float(kept.float().mean()), 0.1 + 0.1 / 256, n_chosen)
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])  # unchosen tokens are untouched
    assert int(inputs.max()) <= 256


def test_training_batches_are_seeded_by_step():
    tokens = np.arange(5000, dtype=np.uint16) % 256
    first = mlm_train_batch(tokens, 4, 16, seed=3, step=7, mask_id=256, n_random=256)
    again = mlm_train_batch(tokens, 4, 16, seed=3, step=7, mask_id=256, n_random=256)
    other = mlm_train_batch(tokens, 4, 16, seed=3, step=8, mask_id=256, n_random=256)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert first[0].shape == (4, 16)


def test_unigram_entropy():
    assert abs(unigram_entropy(np.array([0, 1, 2, 3] * 10), 256) - math.log(4)) < 1e-12
    assert unigram_entropy(np.array([5] * 10), 256) == 0.0


def test_package_snippets_split_by_file_and_are_labelled():
    special = SpecialTokens(256)
    data = stdlib_package_snippets(64, special.cls, special.pad, n_classes=4, max_bytes=1_500_000)
    assert len(data.labels) == 4 and "test" not in data.labels
    assert set(data.train_y.tolist()) == set(range(4)) == set(data.val_y.tolist())
    assert (data.train_x[:, 0] == special.cls).all() and data.train_x.shape[1] == 64
    # padding only at the end, exactly where the mask is 0
    assert torch.equal(data.train_x == special.pad, data.train_mask == 0)
    # no snippet text is on both sides (the split is by file)
    train_rows = {bytes(row[1:][m[1:].bool()].tolist()) for row, m in zip(data.train_x, data.train_mask)}
    val_rows = {bytes(row[1:][m[1:].bool()].tolist()) for row, m in zip(data.val_x, data.val_mask)}
    # the standard library repeats some code verbatim across files (idlelib's test doubles, headers)
    assert len(train_rows & val_rows) < 0.1 * len(val_rows)
