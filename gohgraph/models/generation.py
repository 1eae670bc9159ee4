"""Generation helpers: argument checks, the decode cache, left-padding masks and positions,
next-token sampling."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import GoHConfig
from ..layers.kv_cache import DynamicKVCache, KVCache, SlidingWindowKVCache, StaticKVCache

CACHE_KINDS = ("auto", "static", "dynamic")


def check_generation_arguments(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], vocab_size: int,
                               max_new_tokens: int, temperature: float, top_k: Optional[int],
                               top_p: Optional[float], eos_token_id: Optional[int]) -> None:
    """One-line ``ValueError`` for every argument of ``generate`` that cannot mean what it says."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [batch, seq] tensor with seq >= 1, got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size}), got "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    if type(max_new_tokens) is not int or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and (type(top_k) is not int or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1, or None for no cut")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1], or None for no cut")
    if eos_token_id is not None and (type(eos_token_id) is not int or not 0 <= eos_token_id < vocab_size):
        raise ValueError(f"eos_token_id={eos_token_id!r} must be a token id in [0, {vocab_size})")
    if attention_mask is not None:
        check_left_padding(attention_mask, input_ids.shape)


def make_decode_cache(cfg: GoHConfig, kind: str, capacity: int, n_layers: Optional[int] = None) -> KVCache:
    """The KV cache ``generate`` decodes with, for ``capacity`` positions in all, one slot per
    layer of ``n_layers`` (default ``cfg.n_layers``; a seq2seq decoder has ``cfg.decoder_layers``), two
    with MoSA's sparse heads (:func:`~gohgraph.layers.mosa.sparse_cache_slot`).

    ``"auto"``: a :class:`SlidingWindowKVCache` when every layer attends within a window (memory
    flat in the generated length), else a :class:`StaticKVCache` preallocated for ``capacity``
    positions; ``"static"`` / ``"dynamic"`` force those (``"static"`` ignores the window's memory
    saving, never its mask).
    """
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache={kind!r} is not one of {list(CACHE_KINDS)}")
    n_layers = cfg.n_layers if n_layers is None else n_layers
    if cfg.n_mosa_heads:  # MoSA's sparse heads keep their keys in a second slot per layer
        n_layers = 2 * n_layers
    if kind == "dynamic":
        return DynamicKVCache(n_layers)
    if kind == "auto" and cfg.sliding_window is not None and cfg.sliding_window < capacity:
        return SlidingWindowKVCache(n_layers, cfg.sliding_window)
    return StaticKVCache(n_layers, capacity)


def check_token_mask(attention_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``attention_mask [batch, seq]`` of 0/1 (or bool) with at least one real token per row (a
    query must see some key); returns it as ``long``."""
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}, input_ids {list(shape)}")
    mask = attention_mask.long()
    if not torch.equal(mask, attention_mask.bool().long()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    if (mask.sum(-1) == 0).any():
        raise ValueError("attention_mask has a row without any token")
    return mask


def check_left_padding(attention_mask: torch.Tensor, shape: torch.Size) -> None:
    """:func:`check_token_mask`, and each row zeros then ones (left padding)."""
    mask = check_token_mask(attention_mask, shape)
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError("attention_mask must pad on the left (zeros, then ones): generation appends on the right")


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` position of every token, counted from each row's first real token (padding: 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                      generator: Optional[torch.Generator] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """``logits [batch, vocab]`` -> ``[batch, 1]`` token ids.

    ``temperature == 0`` is greedy (argmax). Otherwise the logits are divided by the temperature,
    cut to the ``top_k`` largest and then to the smallest set whose probability reaches ``top_p``
    (nucleus sampling, Holtzman et al. 2020; the most likely token always stays), and sampled.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        cut = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(cut, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
