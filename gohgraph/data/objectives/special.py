"""Ids of the special tokens the non-LM objectives add after a tokenizer's vocabulary."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecialTokens:
    """``mask``, ``cls`` and ``pad`` ids right after the ``base`` ids of a tokenizer, then ``eos``
    when ``with_eos`` (the seq2seq objective: its targets end with it, so generation learns to stop).

    ``vocab_size`` is what the model needs: ``base + 3`` for the encoder objectives (mlm,
    classify), ``base + 4`` with ``eos``. The three encoder ids keep their places either way, so
    an encoder checkpoint's vocabulary is unchanged by the seq2seq objective's fourth token.
    """

    base: int
    with_eos: bool = False

    @classmethod
    def of_model(cls, config) -> "SpecialTokens":
        """The specials of a model trained by an objective: ``eos`` for ``model_type='seq2seq'``."""
        with_eos = config.is_encoder_decoder
        return cls(config.vocab_size - 3 - int(with_eos), with_eos)

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
    def eos(self) -> int:
        if not self.with_eos:
            raise ValueError("these special tokens have no eos (SpecialTokens(base, with_eos=True) has)")
        return self.base + 3

    @property
    def vocab_size(self) -> int:
        return self.base + 3 + int(self.with_eos)
