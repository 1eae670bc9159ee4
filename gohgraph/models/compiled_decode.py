"""Compiled decoding: the whole one-token step of a decoder through ``torch.compile``.

At batch 1 a decode step is bound by the number of ops it launches (BENCHMARKS.md, "Decode
speed"): a routed layer adds 30–80 small router ops to the attention's ~50. Compiling the routers
alone saves little, because every op between them still runs eagerly; compiling the whole step
(embedding, every block, final norm, logits) lets Inductor fuse the routers' ops with the
attention's. For that the step must have the same shapes at every position, so it writes the
static cache by index (:class:`~gohgraph.layers.kv_cache.StaticSlotWriter`: ``index_copy_`` at a
position held in a tensor) and attends over all ``capacity`` slots with a mask that hides the
unwritten ones and any left padding: one compiled graph serves every step of a generation, and
every later generation of the same batch and capacity.

Per step, in positions ``p`` (the slot of the new token, the same for every row: the cache's
columns are the attention mask's columns) and ``r_b`` (row ``b``'s own position, counted from its
first real token)::

    key_mask[:, p] = 1;  logits = step(ids [batch, 1], positions r [batch, 1], key_mask [batch, capacity])
    p += 1;  r += 1

Routed heads are skipped inside the step too: with top-k routing every token keeps a fixed number
of heads, which the attention gathers by index
(:func:`~gohgraph.layers.head_sparse.gathered_head_attention`, docs/skipping-work.md).

Configurations the static step does not express fall back (:func:`whole_step_unsupported`):
Mixture-of-Recursions (its cache is per recursion and its routing drops tokens), MLA (a latent
cache of another layout), sliding windows and score biases (ALiBi, T5's relative bias: both are
written relative to the newest key, which the slot layout does not have). Expert FFNs
(``ffn="moe"`` and kin) decode correctly through the compiled step but break its graph at their
dispatch (``bincount``: shapes that depend on the routing), so they gain less.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..config import GoHConfig
from ..layers.kv_cache import StaticKVCache, StaticSlotWriter
from ..layers.positions import ON_SCORES, POSITION_SCHEMES, has_attention_bias
from .output_head import output_logits


def whole_step_unsupported(cfg: GoHConfig) -> Optional[str]:
    """Why the whole compiled step cannot decode a model of ``cfg``, or ``None`` when it can."""
    if cfg.recursion == "mor":
        return "Mixture-of-Recursions"
    if cfg.attention == "mla":
        return "MLA's latent cache"
    if cfg.sliding_window is not None:
        return "a sliding window"
    if cfg.n_mosa_heads:
        return "MoSA's sparse heads (their cache slot holds the inference rule's decisions)"
    if has_attention_bias(cfg) or POSITION_SCHEMES[cfg.position_embedding].acts_on == ON_SCORES:
        return f"position_embedding={cfg.position_embedding!r} (a bias on the scores)"
    return None


def decode_step(model: nn.Module, ids: torch.Tensor, writer: StaticSlotWriter, positions: torch.Tensor,
                key_mask: torch.Tensor) -> torch.Tensor:
    """One token per row through ``model`` (a :class:`~gohgraph.GoHTransformer`): ``ids [batch, 1]``
    at ``positions [batch, 1]``; its keys and values go to slot ``writer.position`` and it sees the
    slots where ``key_mask [batch, capacity]`` (bool) is true. Returns the logits ``[batch, vocab]``.
    The same function runs eagerly and compiled (what the forward does for one cached token,
    without the checks and losses a generation does not need)."""
    x = model.embed_tokens(ids, positions)
    mask = key_mask[:, None, None, :]  # [batch, 1, 1, capacity]
    for block in model.blocks:
        x, _ = block(x, cache=writer, causal=True, mask=mask, positions=positions)
    x = model.final_norm(x[:, -1])
    return output_logits(model, x)


class CompiledDecoder:
    """Runs the one-token steps of a generation through one compiled :func:`decode_step`.

    Built after the prompt went through the model eagerly into ``cache`` (a
    :class:`StaticKVCache`); ``attention_mask [batch, prompt]`` is the prompt's (``None``: no
    padding). :meth:`__call__` takes the newest ids ``[batch, 1]`` and returns the next logits
    ``[batch, vocab]``; ``step`` is the compiled function (shared by every generation of the model,
    see :func:`compiled_step`) or :func:`decode_step` itself.
    """

    def __init__(self, model: nn.Module, cache: StaticKVCache, attention_mask: Optional[torch.Tensor],
                 step: Callable) -> None:
        batch, prompt = cache.keys[0].shape[0], cache.length()
        device = cache.keys[0].device
        self.model, self.step = model, step
        self.key_mask = torch.zeros(batch, cache.capacity, dtype=torch.bool, device=device)
        if attention_mask is None:
            self.key_mask[:, :prompt] = True
            self.positions = torch.full((batch, 1), prompt, dtype=torch.long, device=device)
        else:
            self.key_mask[:, :prompt] = attention_mask.bool()
            self.positions = attention_mask.long().sum(-1, keepdim=True)  # real tokens so far
        self.slot = torch.full((1,), prompt, dtype=torch.long, device=device)
        self.filled = prompt  # the slot's value, on the Python side (no device sync per step)
        self.writer = StaticSlotWriter(cache, self.slot)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.filled >= self.key_mask.shape[1]:
            raise ValueError(f"StaticKVCache holds {self.key_mask.shape[1]} positions; one more was asked for")
        self.key_mask.index_fill_(1, self.slot, True)
        # contiguous: the graph is guarded on strides, and a sliced [batch, 1] would recompile it
        logits = self.step(self.model, ids.contiguous(), self.writer, self.positions, self.key_mask)
        self.slot += 1
        self.positions += 1
        self.filled += 1
        return logits

    def sync(self) -> None:
        """Make the static cache's Python-side lengths count the compiled steps too."""
        self.writer.sync()


def compiled_step(model: nn.Module) -> Callable:
    """``torch.compile(decode_step)`` for ``model``, built once and kept on it (out of its state
    dict). Static shapes (``dynamic=False``): one graph per batch size and capacity. Dynamo keeps
    its graphs per code object, so every model's graphs count against one limit
    (``torch._dynamo.config.cache_size_limit``, 8 by default); past it, steps run eagerly (same
    outputs)."""
    step = model.__dict__.get("_compiled_decode_step")
    if step is None:
        step = torch.compile(decode_step, dynamic=False)
        model.__dict__["_compiled_decode_step"] = step
    return step
