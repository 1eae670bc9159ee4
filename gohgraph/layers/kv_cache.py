"""Key/value caches for incremental decoding: an interface and three implementations.

The attention talks to a cache only through :class:`KVCache` (``length`` and ``append``), so any
of these serves it unchanged:

* :class:`DynamicKVCache` grows by concatenation: any batch, any length (tests, odd shapes);
* :class:`StaticKVCache` writes into buffers preallocated for the whole generation (what
  ``generate`` uses): no reallocation and copy of the whole cache per step;
* :class:`SlidingWindowKVCache` keeps only the newest ``window - 1`` positions (Mistral's sliding
  window), so its memory stays flat however long the generation runs.

Every cache returns the keys of the newest positions, contiguous and in order, ending at the
current token: a query's mask can then be written in positions relative to the returned keys.
The one exception is :class:`StaticSlotWriter`, the view of a :class:`StaticKVCache` that a
compiled one-token decode step writes through: it returns all ``capacity`` slots, written or not
(``returns_all_slots``), so every step has the same shapes, and the caller's mask says which
slots a query sees.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import List, Optional, Tuple

import torch


class KVCache(ABC):
    """Keys and values of the positions seen so far, one entry per layer.

    Shapes: keys and values ``[batch, kv_heads, seq, head_dim]``.
    """

    # True for a cache whose ``append`` returns every preallocated slot (the attention then takes
    # the caller's mask as the whole truth: causality, padding, unwritten slots)
    returns_all_slots = False

    @abstractmethod
    def length(self, layer: int = 0) -> int:
        """Positions cached for ``layer`` (the offset of the next token)."""

    @abstractmethod
    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions' keys/values; return everything cached for ``layer``."""


class DynamicKVCache(KVCache):
    """A cache that grows by concatenation: any batch, any length, no memory reserved ahead."""

    def __init__(self, n_layers: int) -> None:
        self.keys: List[Optional[torch.Tensor]] = [None] * n_layers
        self.values: List[Optional[torch.Tensor]] = [None] * n_layers

    def length(self, layer: int = 0) -> int:
        keys = self.keys[layer]
        return 0 if keys is None else keys.shape[2]

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            keys = torch.cat([self.keys[layer], keys], dim=2)
            values = torch.cat([self.values[layer], values], dim=2)
        self.keys[layer], self.values[layer] = keys, values
        return keys, values


class StaticKVCache(KVCache):
    """Buffers ``[batch, kv_heads, capacity, head_dim]`` per layer, zeroed at the first append
    (when batch, heads, dtype and device are known) and written in place; ``append`` returns views
    of the filled part. Appending past ``capacity`` raises ``ValueError``.
    """

    def __init__(self, n_layers: int, capacity: int) -> None:
        self.capacity = capacity
        self.keys: List[Optional[torch.Tensor]] = [None] * n_layers
        self.values: List[Optional[torch.Tensor]] = [None] * n_layers
        self.lengths = [0] * n_layers

    def length(self, layer: int = 0) -> int:
        return self.lengths[layer]

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        start, end = self.lengths[layer], self.lengths[layer] + keys.shape[2]
        if end > self.capacity:
            raise ValueError(f"StaticKVCache holds {self.capacity} positions; {end} were asked for")
        if self.keys[layer] is None:
            batch, heads, _, head_dim = keys.shape
            # zeros, not empty: a compiled step attends over unwritten slots under a mask, and a
            # masked slot's NaN garbage would still reach the output (0 * NaN = NaN)
            self.keys[layer] = keys.new_zeros(batch, heads, self.capacity, head_dim)
            self.values[layer] = values.new_zeros(batch, heads, self.capacity, values.shape[-1])
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class StaticSlotWriter(KVCache):
    """Writes one-token steps into a :class:`StaticKVCache` at a position held in a tensor, so a
    compiled decode step has the same shapes and the same graph at every position.

    ``position [1]`` (long) is the slot the next token's keys and values go to (``index_copy_``
    along the sequence axis); ``append`` returns the whole buffers ``[batch, kv_heads, capacity,
    head_dim]``, unwritten slots included (``returns_all_slots``): the attention must get a mask
    that hides every slot after ``position`` (and any left padding). Nothing on the Python side
    changes per step (no int to guard on, no recompilation); the caller advances ``position`` and,
    when it is done, :meth:`sync` sets the static cache's lengths to match.
    """

    returns_all_slots = True

    def __init__(self, cache: StaticKVCache, position: torch.Tensor) -> None:
        if any(keys is None for keys in cache.keys):
            raise ValueError("StaticSlotWriter needs a StaticKVCache whose buffers exist (run the prompt first)")
        self.keys, self.values, self.position = cache.keys, cache.values, position
        self.cache = cache

    def length(self, layer: int = 0) -> int:
        raise TypeError("StaticSlotWriter has no Python-side length: pass positions (a tensor) to the attention")

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer].index_copy_(2, self.position, keys)
        self.values[layer].index_copy_(2, self.position, values)
        return self.keys[layer], self.values[layer]

    def sync(self) -> None:
        """Set the static cache's lengths to ``position`` (after the compiled steps)."""
        self.cache.lengths = [int(self.position)] * len(self.cache.lengths)


class SlidingWindowKVCache(KVCache):
    """Keeps the newest ``window - 1`` positions per layer: with its own key, all a query of a
    sliding-window attention can see. ``length`` counts every position seen (RoPE's offset),
    ``stored`` what is held.
    """

    def __init__(self, n_layers: int, window: int) -> None:
        self.window = window
        self.keys: List[Optional[torch.Tensor]] = [None] * n_layers
        self.values: List[Optional[torch.Tensor]] = [None] * n_layers
        self.seen = [0] * n_layers

    def length(self, layer: int = 0) -> int:
        return self.seen[layer]

    def stored(self, layer: int = 0) -> int:
        keys = self.keys[layer]
        return 0 if keys is None else keys.shape[2]

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self.seen[layer] += keys.shape[2]
        if self.keys[layer] is not None:
            keys = torch.cat([self.keys[layer], keys], dim=2)
            values = torch.cat([self.values[layer], values], dim=2)
        keep = self.window - 1
        # clone: a view would pin the whole concatenated tensor and the memory would grow again
        self.keys[layer] = keys[:, :, -keep:].clone() if keep else keys[:, :, :0]
        self.values[layer] = values[:, :, -keep:].clone() if keep else values[:, :, :0]
        return keys, values
