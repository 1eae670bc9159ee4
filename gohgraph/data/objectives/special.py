"""Ids of the special tokens the encoder objectives add after a tokenizer's vocabulary."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecialTokens:
    """``mask``, ``cls`` and ``pad`` ids right after the ``base`` ids of a tokenizer.

    ``vocab_size`` is what the model needs: ``base + 3``.
    """

    base: int

    @property
    def mask(self) -> int:
        return self.base

    @property
    def cls(self) -> int:
        return self.base + 1

    @property
    def pad(self) -> int:
        return self.base + 2

    @property
    def vocab_size(self) -> int:
        return self.base + 3
