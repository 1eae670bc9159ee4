"""Which token ids each head or expert served: the vocabulary side of routing statistics.

A :class:`TokenProfile` keeps, for one layer, a ``[vocab, nodes]`` count of how often token id
``v`` activated node ``n`` (a head, or a routed expert counted per sub-token assignment), and
reports each node's most frequent token ids with their share of that node's traffic - the usual
"what does expert 3 specialise in" question. The table grows with the vocabulary, so
:class:`~gohgraph.analysis.stats.collect.RoutingStats` only keeps it while all layers' tables together stay under
:data:`MAX_PROFILE_CELLS` (about 32 MB of float64); larger vocabularies skip it.
"""

from __future__ import annotations

from typing import List

import torch

MAX_PROFILE_CELLS = 1 << 22
TOP_TOKENS = 5


def profile_fits(vocab_size: int, nodes_per_layer: int, n_layers: int) -> bool:
    return vocab_size * nodes_per_layer * n_layers <= MAX_PROFILE_CELLS


class TokenProfile:
    """Running ``[vocab, nodes]`` counts of (token id, node) pairs for one layer."""

    def __init__(self, vocab_size: int, n_nodes: int) -> None:
        self.vocab_size, self.n_nodes = vocab_size, n_nodes
        self.counts = torch.zeros(vocab_size, n_nodes, dtype=torch.float64)

    def add(self, input_ids: torch.Tensor, nodes: torch.Tensor, mask: torch.Tensor = None) -> None:
        """Count ``input_ids [batch, seq]`` against ``nodes [batch, seq, ...]`` node ids.

        Each token is paired with every node id in its trailing dimensions (``mask``, same shape
        as ``nodes``, drops pairs); the work runs on ``nodes``' device, only the table sits on CPU.
        """
        ids = input_ids.to(nodes.device).long()
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"input_ids must lie in 0..{self.vocab_size - 1} (vocab_size)")
        ids = ids.reshape(*ids.shape, *([1] * (nodes.dim() - ids.dim()))).expand_as(nodes)
        pairs = ids * self.n_nodes + nodes.long()
        if mask is not None:
            pairs = pairs[mask]
        counts = torch.bincount(pairs.reshape(-1), minlength=self.vocab_size * self.n_nodes)
        self.counts += counts.double().view(self.vocab_size, self.n_nodes).cpu()

    def top_tokens(self, k: int = TOP_TOKENS) -> List[List[List[float]]]:
        """Per node, up to ``k`` ``[token_id, share of the node's count]`` pairs, most frequent first."""
        totals = self.counts.sum(0)
        k = min(k, self.vocab_size)
        values, ids = self.counts.topk(k, dim=0)  # [k, nodes]
        result = []
        for node in range(self.n_nodes):
            total = float(totals[node])
            result.append([[int(ids[r, node]), float(values[r, node]) / total]
                           for r in range(k) if values[r, node] > 0])
        return result
