"""Sampling the next token from logits: greedy, temperature and top-k."""

from __future__ import annotations

from typing import Optional

import torch


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``logits [batch, vocab]`` -> ``[batch, 1]`` token ids (argmax when ``temperature == 0``)."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
