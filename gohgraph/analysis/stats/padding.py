"""Padding never counts: keep only the real tokens of a routing record.

Every statistic of :mod:`gohgraph.analysis.stats` is a sum over tokens. With an
``attention_mask [batch, seq]`` (1 = token, 0 = padding, as :meth:`GoHTransformer.forward` takes
it) the records are first cut down to their real tokens, laid out as one row ``[1, n_real, ...]``;
every tally then runs unchanged and padding cannot leak into any count, gate mass, token profile
or cross-layer pair.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from ...routing import LayerRouting


def check_attention_mask(attention_mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``attention_mask`` as a bool ``[batch, seq]`` tensor; ``ValueError`` if its shape or values are wrong."""
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a tensor [batch, seq], got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}; the routing records are "
                         f"[batch, seq] = {list(shape)}")
    if attention_mask.dtype != torch.bool and attention_mask.numel() and \
            not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    return attention_mask.bool()


def without_padding(record: LayerRouting, mask: Optional[torch.Tensor]) -> LayerRouting:
    """``record`` restricted to the tokens where ``mask [batch, seq]`` is true, as one row ``[1, n_real, ...]``.

    Per-token tensors (gates, logits, flow, expert ids/weights/drops, SwitchHead's attention experts,
    MoSA's kept tokens and scores) are selected; the losses
    and balance tallies are batch scalars and pass through untouched.
    """
    if mask is None:
        return record
    mask = mask.to(record.head_gates.device)

    def keep(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if tensor is None else tensor[mask].unsqueeze(0)

    def keep_experts(experts):
        if experts is None:
            return None
        return dataclasses.replace(experts, expert_indices=keep(experts.expert_indices),
                                   expert_weights=keep(experts.expert_weights), dropped=keep(experts.dropped),
                                   expert_drops=keep(experts.expert_drops))

    sparse = record.sparse_heads
    if sparse is not None:
        sparse = dataclasses.replace(sparse, selected=keep(sparse.selected), scores=keep(sparse.scores))
    return dataclasses.replace(record, head_gates=keep(record.head_gates), head_logits=keep(record.head_logits),
                               flow=keep(record.flow), experts=keep_experts(record.experts),
                               value_experts=keep_experts(record.value_experts),
                               output_experts=keep_experts(record.output_experts), sparse_heads=sparse)


def ids_without_padding(input_ids: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``input_ids [batch, seq]`` -> ``[1, n_real]`` real token ids (unchanged without a mask)."""
    if input_ids is None or mask is None:
        return input_ids
    return input_ids[mask.to(input_ids.device)].unsqueeze(0)


__all__ = ["check_attention_mask", "ids_without_padding", "without_padding"]
