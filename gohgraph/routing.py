"""What a layer reports about its routing (DESIGN.md §5).

The model returns data, never prints or plots: statistics (``gohgraph.stats``) and pictures
(``viz``) consume these records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch


@dataclass
class LayerRouting:
    """Routing decisions of one transformer layer for one batch.

    Attributes:
        head_gates: ``[batch, seq, heads]`` gate of every head, ``0`` where a head is inactive.
        head_logits: ``[batch, seq, heads]`` router logits, or ``None`` for the dense router.
        flow: ``[batch, seq, n_head_edges]`` inter-head flow weight on each head-graph edge
            (edge order of the layer's ``edge_index``), or ``None`` without flow.
        expert_indices: ``[batch, seq, subtokens, top_k_experts]`` routed expert ids, or ``None``.
        expert_weights: ``[batch, seq, subtokens, top_k_experts]`` their weights (sum to 1).
        dropped: ``[batch, seq, subtokens]`` bool, sub-tokens that overflowed every chosen expert's
            capacity, or ``None``.
        expert_drops: ``[batch, seq, subtokens, top_k_experts]`` bool, which (sub-token, expert)
            assignments overflowed capacity, or ``None``.
        aux_losses: scalar losses of this layer by name (``head_balance``, ``head_z``,
            ``expert_balance``, ``expert_z``), unweighted; they carry gradients.

    Every tensor except ``aux_losses`` is detached: records are for inspection.
    """

    head_gates: torch.Tensor
    head_logits: Optional[torch.Tensor] = None
    flow: Optional[torch.Tensor] = None
    expert_indices: Optional[torch.Tensor] = None
    expert_weights: Optional[torch.Tensor] = None
    dropped: Optional[torch.Tensor] = None
    expert_drops: Optional[torch.Tensor] = None
    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)
