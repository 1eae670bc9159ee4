r"""One round of graph attention (GAT) over a small fixed graph, for every token at once.

Both graph routers run this round: the head router over the head graph (with self-loops), the
expert router over the bipartite sub-token <-> expert graph, in each direction. Destination node
:math:`i` gathers from its source neighbours :math:`j`:

.. math::
    \alpha_{ji} = \mathrm{softmax}_{j \in \mathcal{N}(i)}
        \mathrm{LeakyReLU}(s^{src}_j + s^{dst}_i), \qquad
    \mathrm{out}_i = \sum_{j \in \mathcal{N}(i)} \alpha_{ji}\, h_j

with per-node scores :math:`s = a^\top h` computed by the caller (who owns the parameters). A
destination without in-edges receives nothing (its sum is 0).

The same small ``edge_index`` serves every token: the round runs with ``node_dim=-2`` on
``[tokens, nodes, feat]``. Two paths compute the same values:

* ``fused=True``: a dense ``[dst, src]`` masked softmax (:func:`~gohgraph.ops.small_softmax.small_softmax`)
  and one batched matmul; its cost grows with ``n_dst * n_src`` per token;
* ``fused=False``: PyG's ``propagate`` (gather, scatter softmax over in-edges, scatter-add), whose
  cost grows with the number of edges. It is the reference the tests compare the fused path with.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import softmax as scatter_softmax

from ..graph import bipartite_adjacency
from ..ops.small_softmax import small_softmax

# GAT's negative slope (Velickovic et al. 2018; PyG's GATConv default)
LEAKY_RELU_SLOPE = 0.2


class GraphAttention(MessagePassing):
    r"""The aggregation of one GAT round over a fixed graph; routers subclass it and own the weights.

    Args:
        attention_edge_index: ``[2, E]`` edges the attention runs over, row 0 in ``0..n_src-1``,
            row 1 in ``0..n_dst-1`` (a head router passes its graph plus self-loops).
        n_src, n_dst: node counts on each side (equal for a head graph).
    Shapes (:meth:`attend`): ``h_src [tokens, n_src, F]``, ``score_src [tokens, n_src, 1]``,
    ``score_dst [tokens, n_dst, 1]`` -> ``aggregated [tokens, n_dst, F]`` and the attention
    ``alpha``: ``[tokens, n_dst, n_src]`` (zero off the graph) on the fused path,
    ``[tokens, E]`` in ``attention_edge_index`` order on the propagate path.
    """

    def __init__(self, attention_edge_index: torch.Tensor, n_src: int, n_dst: int) -> None:
        super().__init__(aggr="add", node_dim=-2)
        self.n_src, self.n_dst = n_src, n_dst
        adjacency = bipartite_adjacency(attention_edge_index, n_src, n_dst)  # [dst, src]
        has_in_edge = adjacency.any(dim=-1, keepdim=True)
        self.register_buffer("attention_edge_index", attention_edge_index.clone(), persistent=False)
        # a complete graph has nothing to mask, and with every destination reached nothing to zero:
        # the fused path then skips both ops
        self.masks_scores = not bool(adjacency.all())
        self.zeroes_unreached = not bool(has_in_edge.all())
        # masked with -inf before the softmax; rows without in-edges stay finite and are zeroed after
        self.register_buffer("softmax_mask", ~adjacency & has_in_edge, persistent=False)
        self.register_buffer("attention_adjacency", adjacency.float(), persistent=False)
        self._alpha: Optional[torch.Tensor] = None

    def attend(self, h_src: torch.Tensor, score_src: torch.Tensor, score_dst: torch.Tensor,
               fused: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Aggregate ``h_src`` at every destination; see the class docstring for shapes."""
        if fused:
            logits = F.leaky_relu(score_dst + score_src.transpose(1, 2), negative_slope=LEAKY_RELU_SLOPE)
            if self.masks_scores:
                logits = logits.masked_fill(self.softmax_mask, float("-inf"))
            alpha = small_softmax(logits, dim=-1)
            if self.zeroes_unreached:
                alpha = alpha * self.attention_adjacency
            return torch.matmul(alpha, h_src), alpha
        aggregated = self.propagate(self.attention_edge_index, x=(h_src, None), score=(score_src, score_dst),
                                    size=(self.n_src, self.n_dst))
        alpha, self._alpha = self._alpha, None
        return aggregated, alpha[..., 0]

    def message(self, x_j: torch.Tensor, score_j: torch.Tensor, score_i: torch.Tensor,
                index: torch.Tensor, ptr: Optional[torch.Tensor], size_i: Optional[int]) -> torch.Tensor:
        """``x_j [tokens, E, F]``, scores ``[tokens, E, 1]``: the attention-weighted source feature."""
        alpha = F.leaky_relu(score_i + score_j, negative_slope=LEAKY_RELU_SLOPE)
        alpha = scatter_softmax(alpha, index, ptr, size_i, dim=-2)  # over the in-edges of each destination
        self._alpha = alpha
        return alpha * x_j
