"""What a layer reports about its routing (docs/routing.md): one record, with an experts part.

The model returns data, never prints or plots: statistics (:mod:`gohgraph.analysis.stats`) and
pictures (:mod:`gohgraph.viz`) consume these records. The attention fills the head fields; an
expert feed-forward layer returns an :class:`ExpertRouting`, which the block attaches as
``record.experts`` (no field is copied, so a new expert field is a change to one class).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

# The attention kinds whose heads are routed: the keys of every model output's routing_by_kind()
# (gohgraph.models.families declares which kinds each family has). A decoder-only model and an
# encoder route one kind each; a seq2seq model routes its encoder's, its decoder's and the cross-attention.
KIND_DECODER = "decoder"  # a decoder-only model's causal self-attention
KIND_ENCODER = "encoder"  # bidirectional self-attention: an encoder's, or a seq2seq model's encoder
KIND_DECODER_SELF = "decoder_self"  # a seq2seq decoder's causal self-attention
KIND_CROSS = "cross"  # a seq2seq decoder's attention over the encoder output


@dataclass
class ExpertRouting:
    """Expert decisions of one layer.

    Attributes:
        expert_indices: ``[batch, seq, subtokens, top_k_experts]`` routed expert ids.
        expert_weights: ``[batch, seq, subtokens, top_k_experts]`` their weights (sum to 1), or ``None``.
        dropped: ``[batch, seq, subtokens]`` bool, sub-tokens that overflowed every chosen expert's
            capacity, or ``None``.
        expert_drops: ``[batch, seq, subtokens, top_k_experts]`` bool, which (sub-token, expert)
            assignments overflowed capacity, or ``None``.
        aux_losses: ``expert_balance`` and ``expert_z`` (absent when its weight is 0), unweighted
            scalars with gradients, over real tokens only (padding adds no term).
        balance: the counts and probability sums behind ``expert_balance`` (a
            :class:`~gohgraph.routers.losses.BalanceTally`), for pooling the loss over layers.
        router_margins: ``[batch, seq, subtokens]`` the k-th minus the (k+1)-th largest selection
            score (the logit, plus the auxiliary-loss-free bias where one is used: what top-k
            ranked), detached; ``nan`` where the (k+1)-th expert was forbidden; ``None`` while
            decoding or when every expert is chosen.
        router_input_rms: 0-dim RMS of the router's input (the sub-tokens) over real tokens,
            detached, for the routing-health scalars.
    """

    expert_indices: torch.Tensor
    expert_weights: Optional[torch.Tensor] = None
    dropped: Optional[torch.Tensor] = None
    expert_drops: Optional[torch.Tensor] = None
    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    balance: Optional[Any] = None
    router_margins: Optional[torch.Tensor] = None
    router_input_rms: Optional[torch.Tensor] = None


@dataclass
class TokenSelection:
    """MoSA's sparse heads (``n_mosa_heads > 0``): which tokens each head kept, and with what weight.

    Attributes:
        selected: ``[batch, seq, sparse_heads]`` bool, the tokens each sparse head attended among
            (in training its top-k of the sequence, in evaluation the decode rule's, ``mosa_inference``).
        scores: ``[batch, seq, sparse_heads]`` float32 router scores ``sigmoid(w_h . x)`` (the
            weight of a kept token's output; non-competitive: they do not sum to 1).
        aux_losses: ``mosa_aux_bce`` (in training: the inference router's BCE against the top-k
            choice), unweighted.
    """

    selected: torch.Tensor
    scores: torch.Tensor
    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LayerRouting:
    """Routing decisions of one transformer layer for one batch.

    Attributes:
        head_gates: ``[batch, seq, heads]`` gate of every head, ``0`` where a head is inactive.
        head_logits: ``[batch, seq, heads]`` router logits, or ``None`` for the dense router.
        flow: ``[batch, seq, n_head_edges]`` inter-head flow weight on each head-graph edge
            (edge order of the layer's ``edge_index``), or ``None`` without flow.
        head_losses: ``head_balance`` and ``head_z`` (absent when its weight is 0) of the head
            router, unweighted, over real tokens only.
        experts: the expert feed-forward layer's :class:`ExpertRouting`, or ``None`` (dense FFN).
        value_experts, output_experts: SwitchHead's choices (``n_attention_experts > 0``), else
            ``None``: :class:`ExpertRouting` with ``expert_indices [batch, len, heads, k]`` (each
            head's own experts, ``0..E-1``; value side over kv heads and the key/value tokens,
            output side over the query heads and tokens) and ``expert_weights`` their sigmoid
            scores (non-competitive: they do not sum to 1); no losses.
        head_balance: the counts and probability sums behind ``head_balance`` (a
            :class:`~gohgraph.routers.losses.BalanceTally`), for global-batch pooling, or ``None``.
        router_input_rms: 0-dim RMS of the head router's input over real tokens (detached), for
            the health scalars (:mod:`gohgraph.analysis.stats.health`), or ``None``.
        sparse_heads: MoSA's :class:`TokenSelection` (``n_mosa_heads > 0``), else ``None``.

    The expert fields read through: ``record.expert_indices`` is ``record.experts.expert_indices``
    (``None`` without experts), and :attr:`aux_losses` holds the head and the expert losses.
    Every tensor except the losses is detached: records are for inspection.
    """

    head_gates: torch.Tensor
    head_logits: Optional[torch.Tensor] = None
    flow: Optional[torch.Tensor] = None
    head_losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    experts: Optional[ExpertRouting] = None
    value_experts: Optional[ExpertRouting] = None
    output_experts: Optional[ExpertRouting] = None
    head_balance: Optional[Any] = None
    router_input_rms: Optional[torch.Tensor] = None
    sparse_heads: Optional[TokenSelection] = None

    @property
    def aux_losses(self) -> Dict[str, torch.Tensor]:
        """Every routing loss of the layer by name (head, sparse-head and expert), unweighted."""
        if self.experts is None and self.sparse_heads is None:
            return self.head_losses
        return {**self.head_losses, **(self.sparse_heads.aux_losses if self.sparse_heads is not None else {}),
                **(self.experts.aux_losses if self.experts is not None else {})}

    @property
    def expert_indices(self) -> Optional[torch.Tensor]:
        return None if self.experts is None else self.experts.expert_indices

    @property
    def expert_weights(self) -> Optional[torch.Tensor]:
        return None if self.experts is None else self.experts.expert_weights

    @property
    def dropped(self) -> Optional[torch.Tensor]:
        return None if self.experts is None else self.experts.dropped

    @property
    def expert_drops(self) -> Optional[torch.Tensor]:
        return None if self.experts is None else self.experts.expert_drops


@dataclass
class RecursionRouting:
    """Mixture-of-Recursions decisions for one batch (:mod:`gohgraph.models.recursion`).

    Attributes:
        selected: ``[recursions, batch, seq]`` bool, which tokens took each recursion (the first
            holds every real token, padding excluded; later ones are nested subsets).
        depth: ``[batch, seq]`` number of recursions each token took (1..max_recursions).
        gates: ``[recursions, batch, seq]`` the gate ``g`` of each token's update (1 for the
            first recursion, 0 where a token did not take the recursion).
        aux_losses: ``recursion_balance`` (token-choice) or ``recursion_aux_bce`` (expert-choice,
            in training), unweighted.
    """

    selected: torch.Tensor
    depth: torch.Tensor
    gates: torch.Tensor
    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)


def router_input_rms(inputs: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """0-dim RMS of a router's ``inputs`` (tokens first, features last) over real tokens
    (``token_mask``, one entry per token, or ``None``), detached and kept on the device (read only
    when metrics are logged: no sync)."""
    squares = inputs.detach().float().pow(2).reshape(token_mask.numel() if token_mask is not None
                                                     else inputs.shape[0], -1).mean(-1)
    if token_mask is None:
        return squares.mean().sqrt()
    weight = token_mask.reshape(-1).to(squares.dtype)
    return ((squares * weight).sum() / weight.sum().clamp(min=1)).sqrt()
