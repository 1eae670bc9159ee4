r"""Vocabulary specialisation: which unit each token id routes to most, and which token ids each unit serves.

OLMoE's vocabulary specialisation (Muennighoff et al. 2024, §5.3), per layer, for routed heads and
for routed experts, keyed either by the **input** token id ``v`` of a position or by the token the
model **predicts** there (the argmax of its next-token logits; decoders only). From the counts
``N[v, u]`` (positions with key ``v`` whose decision selected unit ``u``: a routed head active at
the token, or expert ``u`` among a sub-token's top-``k``) and the decisions ``D[v]`` made for
key ``v`` (its occurrences for heads, occurrences times ``m`` sub-tokens for experts), the
specialisation of ``v`` to ``u`` is

.. math::  s(v, u) = \frac{N[v, u]}{D[v]} \in [0, 1],

the share of ``v``'s decisions that select ``u`` (1: every occurrence of ``v`` goes there).
Reported per layer and unit kind:

* ``by_token`` - for every key seen: ``token_id``, ``occurrences``, ``top_unit`` = :math:`\arg\max_u
  s(v, u)` (the lowest id on a tie) and ``top_share`` = its :math:`s`, how concentrated ``v`` is;
* ``units`` - the unit ids (routed heads keep their ids among all heads);
* ``top_tokens`` - per unit (in ``units`` order), up to :data:`TOP_TOKENS` ``[token_id, s(v, u), occurrences]`` with the
  highest :math:`s(v, u)` among keys seen at least ``min_occurrences`` times (fewer occurrences give
  shares of 1 by chance), highest first, the more frequent key first on a tie.

Shared heads are left out (always on: :math:`s = 1` for every key); padding never counts.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

TOP_TOKENS = 5
MIN_OCCURRENCES = 5  # the fewest occurrences a key needs to enter a unit's top_tokens
KEYS = ("input", "predicted")


def specialisation(counts: torch.Tensor, decisions: torch.Tensor) -> torch.Tensor:
    """``counts [vocab, units]``, ``decisions [vocab]`` -> ``s [vocab, units]`` float64 (0 for unseen keys)."""
    return counts.double() / decisions.double().clamp(min=1)[:, None]


def vocabulary_section(counts: torch.Tensor, occurrences: torch.Tensor, decisions_per_token: int = 1,
                       min_occurrences: int = MIN_OCCURRENCES, top_tokens: int = TOP_TOKENS,
                       first_unit: int = 0) -> Dict[str, Any]:
    """``by_token`` and ``top_tokens`` (module docstring) of one layer, unit kind and key.

    ``counts [vocab, units]``: selections per key; ``occurrences [vocab]``: positions per key;
    ``decisions_per_token``: decisions each position makes (``m`` sub-tokens for experts);
    ``first_unit``: the id of column 0 (``n_shared_heads`` for routed heads), so units keep their ids.
    """
    if isinstance(min_occurrences, bool) or not isinstance(min_occurrences, int) or min_occurrences < 1:
        raise ValueError(f"min_occurrences={min_occurrences!r} must be an int >= 1")
    scores = specialisation(counts, occurrences * decisions_per_token)
    seen = torch.nonzero(occurrences > 0).flatten()
    top_share, top_unit = scores[seen].max(dim=1) if seen.numel() else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
    by_token = {"token_id": [int(v) for v in seen.tolist()],
                "occurrences": [int(round(float(occurrences[v]))) for v in seen.tolist()],
                "top_unit": [first_unit + int(u) for u in top_unit.tolist()],
                "top_share": [float(s) for s in top_share.tolist()]}
    eligible = torch.nonzero(occurrences >= min_occurrences).flatten().tolist()
    per_unit = []
    for unit in range(counts.shape[1]):
        ranked = sorted(((float(scores[v, unit]), float(occurrences[v]), v) for v in eligible
                         if counts[v, unit] > 0), key=lambda row: (-row[0], -row[1], row[2]))
        per_unit.append([[v, share, int(round(n))] for share, n, v in ranked[:top_tokens]])
    return {"units": list(range(first_unit, first_unit + counts.shape[1])), "by_token": by_token,
            "top_tokens": per_unit}


def vocabulary_layer(occurrences: Dict[str, torch.Tensor], head_counts: Dict[str, Optional[torch.Tensor]],
                     expert_counts: Dict[str, Optional[torch.Tensor]], n_shared_heads: int, n_subtokens: int,
                     min_occurrences: int = MIN_OCCURRENCES) -> Dict[str, Any]:
    """One layer's ``{"heads": {key: section}, "experts": {key: section}}`` for the keys counted.

    ``head_counts[key] [vocab, heads]`` (all heads; the shared ones are dropped here) and
    ``expert_counts[key] [vocab, routed experts]`` may be ``None`` (no such units, or key not counted).
    """
    out: Dict[str, Any] = {}
    for kind, counts_by_key, per_token, first in (("heads", head_counts, 1, n_shared_heads),
                                                  ("experts", expert_counts, n_subtokens, 0)):
        sections = {}
        for key, counts in counts_by_key.items():
            if counts is None:
                continue
            counts = counts[:, first:] if kind == "heads" else counts
            if counts.shape[1] == 0:
                continue
            sections[key] = vocabulary_section(counts, occurrences[key], per_token, min_occurrences,
                                               first_unit=first)
        if sections:
            out[kind] = sections
    return out
