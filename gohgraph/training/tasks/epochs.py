"""Epochs over a finite training set whose batches are a function of the batch's index alone."""

from __future__ import annotations

import itertools
from typing import Callable, Iterator


class EpochBatches:
    """The ``b``-th training batch of an epoch-based task (classify, seq2seq).

    An epoch is ``n // batch_size`` full batches; epoch ``e`` reads the examples in the order seeded
    ``seed + e * batches_per_epoch`` (the batch index at which it starts) and drops its short last
    batch. So a batch depends on its index alone: a resumed run reads exactly what the
    uninterrupted run read. The training loop's batch index is ``step * grad_accum_steps + micro_step``.
    ``make_order(seed)`` yields one epoch's batches in that seed's order.
    """

    def __init__(self, make_order: Callable[[int], Iterator], n_examples: int, batch_size: int, seed: int,
                 what: str = "training examples"):
        if n_examples < batch_size:
            raise ValueError(f"{n_examples} {what} cannot fill one batch of batch_size={batch_size}")
        self.batches_per_epoch = n_examples // batch_size
        self._make_order, self._seed = make_order, seed
        self._epoch, self._next_offset, self._batches = None, 0, iter(())

    def __call__(self, index: int):
        epoch, offset = divmod(index, self.batches_per_epoch)
        if epoch != self._epoch or offset != self._next_offset:  # a new epoch, or a jump (resume)
            order = self._make_order(self._seed + epoch * self.batches_per_epoch)
            self._batches = itertools.islice(order, offset, None)
            self._epoch = epoch
        self._next_offset = offset + 1
        return next(self._batches)
