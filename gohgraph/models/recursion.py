r"""Mixture-of-Recursions (Bae et al. 2025; docs/recursion.md): a shared stack of blocks, applied up to
``max_recursions`` times, with a router choosing which tokens take each recursion.

Parameter sharing (``cfg.recursion_sharing``): ``"cycle"`` shares all ``n_layers`` blocks as the
stack; ``"middle-cycle"`` keeps the first and the last block unique (run once, for every token)
and shares the ``n_layers - 2`` between them. The effective depth is ``len(stack) * N_r`` (plus 2).

Recursion ``r = 0`` runs the stack on every token. For ``r >= 1`` the router
(:mod:`gohgraph.routers.recursion`; its scores linear in the token or, with
``cfg.recursion_scorer="graph"``, from message passing over the token's heads) selects tokens among
those that took ``r - 1`` and gives each a gate ``g``; selected tokens are updated as

.. math::
    h \leftarrow h + g\,\big(f_r(h) - h\big)

(``f_r`` the stack), unselected ones keep :math:`h`. Keys and values (``cfg.recursion_kv``):

* ``"recursion"`` - **recursion-wise KV caching**: in recursion ``r`` attention sees only the keys
  of the tokens that took ``r`` (the reference code runs the stack on the selected tokens alone).
  Each (recursion, block) has its own cache slot; a token that skips a recursion still writes a
  slot entry, masked out for every later query, so cached decoding equals recomputing.
* ``"shared"`` - **KV sharing**: keys and values are computed and cached in recursion 0 only, for
  every token; in every later recursion block ``i``'s queries attend to recursion 0's keys and
  values of block ``i`` (the cache holds one recursion's worth).

Execution (``cfg.recursion_execution``, docs/skipping-work.md): ``"gather"`` runs recursion ``r >= 1``
only on the tokens that take it: per row the selected tokens are gathered in position order
(padded to the busiest row), the stack runs on them at their original positions under an explicit
mask (recursion-wise KV: causal among the gathered tokens; KV sharing: the gathered queries over
recursion 0's keys of every token), and the update is scattered back. Expert-choice with
capacities 1, 2/3, 1/3 then costs about (1 + 2/3 + 1/3) / 3 of the masked stack. ``"masked"`` (the
reference) runs the stack on every token and discards the unselected results. ``"auto"`` gathers
where it can: without a KV cache passed in (training, scoring; cached prefill and decoding stay
masked) and for attention whose mask says everything (not MLA, ALiBi, T5 bias or sliding windows,
whose masks are written in relative positions). Routed heads or experts inside the stack route
only the gathered tokens in ``"gather"`` mode (their balance losses count the tokens that take the
recursion; masked mode counts every token), and their records hold zeros for the tokens that skip.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import GoHConfig
from ..layers.kv_cache import DynamicKVCache, KVCache
from ..ops.selected_first import selected_first
from ..routers.recursion import ExpertChoiceRecursionRouter, GraphRecursionScorer, TokenChoiceRecursionRouter
from ..routing import LayerRouting, RecursionRouting


def block_applications(cfg: GoHConfig) -> List[Tuple[int, int]]:
    """``(block index, recursion)`` of every block application, in the order the model returns their
    :class:`~gohgraph.routing.LayerRouting` records (``[(i, 0) for each block]`` without recursion)."""
    if cfg.recursion != "mor":
        return [(i, 0) for i in range(cfg.n_layers)]
    blocks = list(range(cfg.n_layers))
    first, stack, last = (blocks[:1], blocks[1:-1], blocks[-1:]) if cfg.recursion_sharing == "middle-cycle" \
        else ([], blocks, [])
    return ([(i, 0) for i in first] + [(i, r) for r in range(cfg.max_recursions) for i in stack]
            + [(i, 0) for i in last])


class RecursionKVCache(DynamicKVCache):
    """A :class:`DynamicKVCache` with one slot per (recursion, block) and, per recursion, which
    cached positions took it (``[batch, positions]`` bool): keys of tokens that skipped a
    recursion are masked out of it."""

    def __init__(self, n_layers: int, max_recursions: int) -> None:
        super().__init__(n_layers * max_recursions)
        self.n_layers = n_layers
        self.took: Dict[int, torch.Tensor] = {}

    def slot(self, recursion: int) -> KVCache:
        return _SlotView(self, recursion * self.n_layers)

    def key_mask(self, recursion: int, selected: torch.Tensor) -> torch.Tensor:
        """Record which of the new positions (``selected [batch, seq]``) took ``recursion``;
        returns the mask of every cached position for it, ``[batch, cached + seq]``."""
        previous = self.took.get(recursion)
        self.took[recursion] = selected if previous is None else torch.cat([previous, selected], dim=1)
        return self.took[recursion]


class _SlotView(KVCache):
    """The cache as one recursion's blocks see it: layer ``i`` is slot ``offset + i``."""

    def __init__(self, cache: KVCache, offset: int) -> None:
        self.cache, self.offset = cache, offset

    def length(self, layer: int = 0) -> int:
        return self.cache.length(self.offset + layer)

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.cache.append(self.offset + layer, keys, values)


class _SharedKeysView(KVCache):
    """Recursion 0's cache as a later recursion's blocks see it under KV sharing: nothing is
    appended, and the keys/values returned are recursion 0's, which already hold the ``new``
    positions of this call (so the queries' offset is the cached length minus ``new``)."""

    def __init__(self, cache: KVCache, new: int) -> None:
        self.cache, self.new = cache, new

    def length(self, layer: int = 0) -> int:
        return self.cache.length(layer) - self.new

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.cache.append(layer, keys[:, :, :0], values[:, :, :0])  # read without writing


class _GatheredKeysView(KVCache):
    """What a block sees in a gathered recursion: the keys it computes (recursion-wise KV) or
    recursion 0's keys of every token (``shared``, KV sharing), with the caller's mask as the whole
    truth (``returns_all_slots``: causality by original position is in the mask)."""

    returns_all_slots = True

    def __init__(self, shared: Optional[KVCache] = None) -> None:
        self.shared = shared

    def length(self, layer: int = 0) -> int:
        return 0

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.shared is None:
            return keys, values
        return self.shared.append(layer, keys, values)


class MixtureOfRecursions(nn.Module):
    """The recursion loop and its router; the blocks stay the model's (``model.blocks``).

    ``forward(blocks, x [batch, seq, d_model], cache, mask [batch, 1, 1, keys] | None, positions,
    token_mask [batch, seq] | None)`` -> ``(x, one LayerRouting per block application,
    RecursionRouting)``. Padding (``token_mask`` ``False``) takes no recursion after the first, has
    no share of a recursion's capacity and adds no recursion loss; the blocks' routers see it too.
    """

    def __init__(self, cfg: GoHConfig) -> None:
        super().__init__()
        self.n_layers, self.max_recursions = cfg.n_layers, cfg.max_recursions
        self.middle_cycle = cfg.recursion_sharing == "middle-cycle"
        self.token_choice = cfg.recursion_router == "token-choice"
        self.kv_sharing = cfg.recursion_kv == "shared"
        # docs/skipping-work.md: gather the tokens a recursion keeps ("auto"/"gather": where the attention
        # allows it and no KV cache is passed in) or run every token and mask ("masked")
        self.recursion_execution, self.gatherable = cfg.recursion_execution, cfg.can_gather_recursions
        # the scores come from the token's heads as nodes of the head graph (routers/recursion.py),
        # one per routed recursion (expert-choice) or per depth (token-choice)
        graph = cfg.recursion_scorer == "graph"
        if self.token_choice:
            scorer = GraphRecursionScorer.from_config(cfg, cfg.max_recursions) if graph else None
            self.router = TokenChoiceRecursionRouter(cfg.d_model, cfg.max_recursions, cfg.init_std,
                                                     graph_scorer=scorer)
        else:
            scorer = GraphRecursionScorer.from_config(cfg, cfg.max_recursions - 1) if graph else None
            self.router = ExpertChoiceRecursionRouter(cfg.d_model, cfg.max_recursions, cfg.recursion_gate_scale,
                                                      cfg.init_std, aux_router=cfg.recursion_inference == "aux-router",
                                                      graph_scorer=scorer)

    def split(self, blocks: Sequence[nn.Module]) -> Tuple[List[nn.Module], List[nn.Module], List[nn.Module]]:
        """``(unique first, shared stack, unique last)`` blocks."""
        blocks = list(blocks)
        if self.middle_cycle:
            return blocks[:1], blocks[1:-1], blocks[-1:]
        return [], blocks, []

    def forward(self, blocks: Sequence[nn.Module], x: torch.Tensor, cache: Optional[KVCache] = None,
                mask: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
                token_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[LayerRouting], RecursionRouting]:
        if cache is not None and not isinstance(cache, RecursionKVCache):
            raise ValueError("a Mixture-of-Recursions model decodes with its own cache: model.new_cache()")
        first, stack, last = self.split(blocks)
        records: List[LayerRouting] = []
        gather = self.recursion_execution != "masked" and self.gatherable and cache is None
        batch, seq = x.shape[:2]
        if cache is None and self.kv_sharing:  # recursion 0's keys must be kept for the later ones
            cache = RecursionKVCache(self.n_layers, 1)

        def run(group, h, recursion, attention_mask):
            view = None
            if cache is not None:
                view = _SharedKeysView(cache.slot(0), seq) if self.kv_sharing and recursion else cache.slot(recursion)
            for block in group:
                h, record = block(h, cache=view, causal=True, mask=attention_mask, positions=positions,
                                  token_mask=token_mask)
                records.append(record)
            return h

        x = run(first, x, 0, mask)
        took = torch.ones(batch, seq, dtype=torch.bool, device=x.device) if token_mask is None else token_mask
        depth_choice = gate_choice = None
        losses: Dict[str, torch.Tensor] = {}
        if self.token_choice:  # every token's depth is decided once, before its first recursion
            depth_choice, gate_choice, losses = self.router(x, token_mask)
        taken, gates = [took], [x.new_ones(batch, seq, dtype=torch.float32)]
        x = run(stack, x, 0, mask)
        for recursion in range(1, self.max_recursions):
            if self.token_choice:
                took, gate = (depth_choice > recursion) & taken[0], gate_choice
            else:
                took, gate, step_losses = self.router(x, recursion, took, token_mask)
                for name, value in step_losses.items():
                    losses[name] = losses.get(name, 0.0) + value
            if gather:
                x = self._gathered_recursion(stack, x, took, gate, mask, positions, cache, records)
            else:
                if self.kv_sharing:  # every token's recursion-0 keys stay visible
                    attention_mask = mask
                else:
                    keys = cache.key_mask(recursion, took) if cache is not None else took
                    attention_mask = keys[:, None, None, :] if mask is None else mask & keys[:, None, None, :]
                updated = run(stack, x, recursion, attention_mask)
                x = torch.where(took.unsqueeze(-1), x + gate.to(x.dtype).unsqueeze(-1) * (updated - x), x)
            taken.append(took)
            gates.append(torch.where(took, gate.to(x.dtype).float(), 0.0))
        x = run(last, x, 0, mask)
        selected = torch.stack(taken)
        record = RecursionRouting(selected=selected, depth=selected.sum(0), gates=torch.stack(gates).detach(),
                                  aux_losses=losses)
        return x, records, record

    def _gathered_recursion(self, stack: Sequence[nn.Module], x: torch.Tensor, took: torch.Tensor,
                            gate: torch.Tensor, mask: Optional[torch.Tensor], positions: Optional[torch.Tensor],
                            cache: Optional[KVCache], records: List[LayerRouting]) -> torch.Tensor:
        """One recursion on the tokens that take it: ``x [batch, seq, d]``, ``took [batch, seq]`` bool,
        ``gate [batch, seq]``; returns ``x`` with ``x_t + g_t (f(x)_t - x_t)`` at the selected tokens."""
        batch, seq, width = x.shape
        n = int(took.sum(1).max())
        if n == 0:
            return x
        # per row the selected tokens first, in position order, then unselected ones as padding
        index = selected_first(took, dim=1)[:, :n]  # [batch, n]
        valid = took.gather(1, index)
        if positions is None:
            positions = torch.arange(seq, device=x.device).expand(batch, seq)
        query_pos = index[:, :, None]
        if self.kv_sharing:  # the gathered queries over recursion 0's keys of every token
            allowed = torch.arange(seq, device=x.device)[None, None, :] <= query_pos
            if mask is not None:
                allowed = allowed & mask[:, 0, :, -seq:]
            view = _GatheredKeysView(_SharedKeysView(cache.slot(0), seq))
        else:  # attention among the gathered tokens, causal by their original positions
            allowed = (index[:, None, :] <= query_pos) & valid[:, None, :]
            if mask is not None:
                allowed = allowed & mask[:, 0, 0, -seq:].gather(1, index)[:, None, :]
            view = _GatheredKeysView()
        # a padding query sees itself, so no row of the mask is empty (its output is dropped)
        allowed = allowed | (query_pos == (index[:, None, :] if not self.kv_sharing
                                           else torch.arange(seq, device=x.device)[None, None, :]))
        h = x.gather(1, index[..., None].expand(batch, n, width))
        selected, selected_positions = h, positions.gather(1, index)
        applications = []
        for block in stack:
            h, record = block(h, cache=view, causal=False, mask=allowed[:, None], positions=selected_positions,
                              token_mask=valid)  # the fillers of short rows are not tokens
            applications.append(record)
        records.extend(_scatter_record(record, index, valid, seq) for record in applications)
        gate = gate.gather(1, index).to(x.dtype).unsqueeze(-1) * valid.unsqueeze(-1).to(x.dtype)
        return x.scatter(1, index[..., None].expand(batch, n, width), selected + gate * (h - selected))

    def extra_repr(self) -> str:
        return (f"max_recursions={self.max_recursions}, sharing={'middle-cycle' if self.middle_cycle else 'cycle'}, "
                f"router={'token-choice' if self.token_choice else 'expert-choice'}")


def _scatter_record(record: LayerRouting, index: torch.Tensor, valid: torch.Tensor, seq: int) -> LayerRouting:
    """A record of a gathered run (``[batch, n, ...]`` per token) laid out over all ``seq`` tokens,
    zeros at the tokens that skipped the recursion."""
    batch, n = index.shape

    def spread(value):
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or tuple(value.shape[:2]) != (batch, n):
            return value
        kept = value * valid.view(batch, n, *([1] * (value.dim() - 2))).to(value.dtype)
        target = value.new_zeros(batch, seq, *value.shape[2:])
        return target.scatter(1, index.view(batch, n, *([1] * (value.dim() - 2))).expand_as(value), kept)

    for holder in (record, record.experts):
        if holder is None:
            continue
        for item in dataclasses.fields(holder):
            setattr(holder, item.name, spread(getattr(holder, item.name)))
    return record
