"""Measuring cost fairly: interleaved median wall-clock times and the activation bytes of a step."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Iterable, List

import torch


def interleaved_median_seconds(runs: Dict[str, Callable[[], object]], repeats: int,
                               warmup: int = 1) -> Dict[str, float]:
    """Median wall-clock seconds of every callable, timed in turn (a, b, c, a, b, c, ...) so that a
    noisy stretch of a shared machine hits all of them alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    samples: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def saved_tensor_bytes(run: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``run()`` builds its graph.

    The activation memory of a training step, counted rather than sampled: tensors sharing a
    storage count once, and storages of ``exclude`` (e.g. the parameters) not at all. ``run`` may
    call ``backward()`` itself; saved tensors are recorded when they are packed, in the forward pass.
    """
    excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    storages: Dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())
