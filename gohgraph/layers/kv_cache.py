"""Key/value caches for incremental decoding: an interface and the dynamic implementation.

The attention talks to a cache only through :class:`KVCache` (``length`` and ``append``), so a
preallocated, sliding-window or latent (MLA) cache replaces :class:`DynamicKVCache` without
touching the attention code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import List, Optional, Tuple

import torch


class KVCache(ABC):
    """Keys and values of the positions seen so far, one entry per layer.

    Shapes: keys and values ``[batch, kv_heads, seq, head_dim]``.
    """

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
