"""Masked language modelling (BERT, Devlin et al. 2019): choose 15% of the tokens; of those, 80%
become ``[MASK]``, 10% a random token, 10% stay; the loss is the cross-entropy at chosen positions.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from ..batches import eval_batches, train_batch

MASK_RATE = 0.15
MASK_TOKEN_SHARE, RANDOM_TOKEN_SHARE = 0.8, 0.1  # the remaining 10% keep their token


def mask_tokens(ids: torch.Tensor, mask_id: int, n_random: int, generator: torch.Generator,
                rate: float = MASK_RATE) -> Tuple[torch.Tensor, torch.Tensor]:
    """``ids [batch, seq]`` -> ``(inputs, labels)``, both ``[batch, seq]``.

    Each token is chosen independently with probability ``rate``; a chosen token becomes
    ``mask_id`` with probability 0.8, a uniform random id in ``[0, n_random)`` with 0.1, and stays
    with 0.1. ``labels`` hold the original id at chosen positions and ``-100`` elsewhere.
    """
    draws = torch.rand(ids.shape, generator=generator)
    kind = torch.rand(ids.shape, generator=generator)
    chosen = draws < rate
    inputs = ids.clone()
    inputs[chosen & (kind < MASK_TOKEN_SHARE)] = mask_id
    randomised = chosen & (kind >= MASK_TOKEN_SHARE) & (kind < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE)
    inputs[randomised] = torch.randint(0, n_random, (int(randomised.sum()),), generator=generator)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return inputs, labels


def mlm_train_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int,
                    mask_id: int, n_random: int, micro_step: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random training windows ``[batch, seq_len]`` of ``tokens``, masked; seeded by
    ``(seed, step, micro_step)``."""
    windows = train_batch(tokens, batch_size, seq_len, seed, step, micro_step)[:, :seq_len]
    # micro-step 0 keeps the mask seed of the runs trained before gradient accumulation existed
    mask_seed = seed * 1_000_003 + step if micro_step == 0 else \
        int(np.random.SeedSequence([seed, step, micro_step]).generate_state(1)[0])
    return mask_tokens(windows, mask_id, n_random, torch.Generator().manual_seed(mask_seed))


def mlm_eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, mask_id: int, n_random: int,
                     max_batches: Optional[int] = None, seed: int = 0
                     ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The validation windows of :func:`~gohgraph.data.batches.eval_batches`, masked with a fixed
    seed, so every evaluation scores the same positions."""
    generator = torch.Generator().manual_seed(seed)
    for batch in eval_batches(tokens, batch_size, seq_len, max_batches):
        yield mask_tokens(batch, mask_id, n_random, generator)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the token frequencies of ``tokens``: the MLM loss of a model that ignores
    the context and predicts the corpus's unigram distribution."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum()) if probs.size else math.nan
