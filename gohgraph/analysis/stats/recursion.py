"""Mixture-of-Recursions statistics: how deep tokens go, and which token ids go deepest.

A :class:`RecursionTally` consumes :class:`~gohgraph.routing.RecursionRouting` records and keeps
float64 sums: the depth histogram (share of tokens that took exactly ``d`` recursions), the share
of tokens that took each recursion, the mean depth, and per token id its mean depth (reported as
the deepest and the shallowest ids among those seen at least :data:`MIN_TOKEN_COUNT` times).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ...routing import RecursionRouting

MIN_TOKEN_COUNT = 5  # a token id seen fewer times has no reliable mean depth
TOP_DEPTH_TOKENS = 5


class RecursionTally:
    """Running sums over ``max_recursions`` recursions and, optionally, a vocabulary."""

    def __init__(self, max_recursions: int, vocab_size: Optional[int] = None) -> None:
        self.max_recursions = max_recursions
        self.depth_counts = torch.zeros(max_recursions, dtype=torch.float64)  # index d - 1
        self.took_counts = torch.zeros(max_recursions, dtype=torch.float64)
        self.tokens = 0
        self.depth_by_token = self.count_by_token = None
        if vocab_size is not None:
            self.depth_by_token = torch.zeros(vocab_size, dtype=torch.float64)
            self.count_by_token = torch.zeros(vocab_size, dtype=torch.float64)

    def add(self, record: RecursionRouting, input_ids: Optional[torch.Tensor] = None) -> None:
        depth = record.depth.reshape(-1).long().cpu()
        if record.selected.shape[0] != self.max_recursions:
            raise ValueError(f"recursion record has {record.selected.shape[0]} recursions, the config "
                             f"max_recursions={self.max_recursions}")
        self.depth_counts += torch.bincount(depth - 1, minlength=self.max_recursions).double()
        self.took_counts += record.selected.reshape(self.max_recursions, -1).sum(-1).double().cpu()
        self.tokens += depth.numel()
        if input_ids is not None and self.depth_by_token is not None:
            ids = input_ids.reshape(-1).long().cpu()
            self.depth_by_token.index_add_(0, ids, depth.double())
            self.count_by_token.index_add_(0, ids, torch.ones_like(depth, dtype=torch.float64))

    def report(self) -> Dict[str, Any]:
        depth_share = self.depth_counts / max(self.tokens, 1)
        report: Dict[str, Any] = {
            "tokens": self.tokens,
            "depth_histogram": depth_share.tolist(),  # [share of tokens with depth 1, 2, ...]
            "mean_depth": float((depth_share * torch.arange(1, self.max_recursions + 1)).sum()),
            "took_recursion": (self.took_counts / max(self.tokens, 1)).tolist(),
        }
        if self.depth_by_token is not None:
            seen = self.count_by_token >= MIN_TOKEN_COUNT
            if seen.any():
                ids = torch.nonzero(seen).flatten()
                mean = self.depth_by_token[ids] / self.count_by_token[ids]
                order = mean.argsort(descending=True)
                k = min(TOP_DEPTH_TOKENS, len(ids))
                report["deepest_tokens"] = [[int(ids[i]), float(mean[i])] for i in order[:k]]
                report["shallowest_tokens"] = [[int(ids[i]), float(mean[i])] for i in order.flip(0)[:k]]
        return report
