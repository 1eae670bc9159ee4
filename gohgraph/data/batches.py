"""Batches of token windows: deterministic validation windows and seeded training windows."""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from .errors import DataError


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                 max_batches: Optional[int] = None) -> Iterator[torch.LongTensor]:
    """Consecutive non-overlapping windows ``[batch, seq_len]`` from the start of ``tokens``.

    Deterministic; the last partial batch is kept (smaller ``batch``), a partial window dropped.
    """
    n_windows = eval_windows(len(tokens), batch_size, seq_len, max_batches)
    if n_windows == 0:
        raise DataError(f"validation data has {len(tokens)} tokens, fewer than seq_len={seq_len}")
    for start in range(0, n_windows, batch_size):
        count = min(batch_size, n_windows - start)
        block = np.asarray(tokens[start * seq_len:(start + count) * seq_len], dtype=np.int64)
        yield torch.from_numpy(block.reshape(count, seq_len))


def eval_windows(n_tokens: int, batch_size: int, seq_len: int, max_batches: Optional[int] = None) -> int:
    """How many ``seq_len`` windows :func:`eval_batches` yields from ``n_tokens`` tokens."""
    n_windows = n_tokens // seq_len
    return n_windows if max_batches is None else min(n_windows, max_batches * batch_size)


def train_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int,
                micro_step: int = 0, rank: int = 0, world_size: int = 1) -> torch.LongTensor:
    """This rank's share ``[batch_size / world_size, seq_len + 1]`` of random training windows.

    The ``batch_size`` window starts of one micro-step come from a generator seeded with
    ``(seed, step, micro_step)`` alone, and rank ``r`` takes the ``r``-th contiguous slice, so the
    data position is just the step (resume needs no sampler state) and ``N`` ranks together see
    exactly the batch one process would.
    """
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must be divisible by world_size={world_size}")
    if len(tokens) < seq_len + 2:
        raise DataError(f"training data has {len(tokens)} tokens; seq_len={seq_len} needs at least {seq_len + 2}")
    rng = np.random.default_rng([seed, step, micro_step])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size, endpoint=True)
    per_rank = batch_size // world_size
    mine = starts[rank * per_rank:(rank + 1) * per_rank]
    windows = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in mine])
    return torch.from_numpy(windows)
