r"""Routing by data source: which heads and experts each corpus / domain / task uses.

Every batch row belongs to one source ``s`` (a ``--data NAME=PATH`` of the run, a domain, a task).
Per source and layer, over the real (non-padding) tokens only:

* ``tokens`` :math:`n_s`; heads: ``activation_count`` :math:`c_{sh}` (tokens with head ``h``
  active), ``activation_frequency`` :math:`c_{sh} / n_s`, ``gate_mass`` (sum of gates) and
  ``mean_gate``;
* experts: ``assignment_count`` :math:`a_{se}` (every top-k assignment of every sub-token),
  ``load`` :math:`a_{se} / \sum_e a_{se}`, ``gate_mass`` (sum of the assignments' weights) and
  ``activation_rate`` :math:`a_{se} / (m\, n_s)`, the share of the source's sub-tokens that have
  ``e`` among their top-k (the quantity OLMoE's domain-specialisation figure plots; it is
  ``k / E`` for uniform routing).

**Specialisation** of node ``x`` (head or routed expert) for source ``s``, with
:math:`N_{sx}` = its count from ``s`` (:math:`c_{sh}` or :math:`a_{se}`),
:math:`N_{\cdot x} = \sum_s N_{sx}` and :math:`n = \sum_s n_s`:

.. math::  \mathrm{spec}(s, x) = \frac{N_{sx} / N_{\cdot x}}{n_s / n}

the node's share of its traffic that comes from ``s`` over the source's share of all tokens. It
is 1 when the node sees the source at the source's base rate (no preference), ``> 1`` when it
prefers the source (at most ``n / n_s``, reached when the node serves only ``s``), ``< 1`` when it
avoids it, and ``None`` for a node that no source ever chose. Equivalently it is the node's
activation rate on ``s`` over its activation rate on all sources
(:math:`(N_{sx}/n_s) / (N_{\cdot x}/n)`), so shared heads, always on, score exactly 1.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from ...routing import LayerRouting


class SourceTally:
    """Running float64 per-source sums over ``n_layers`` layers (records with a mask, see :meth:`add`)."""

    def __init__(self, sources: Sequence[str], n_layers: int, n_heads: int, n_routed_experts: int,
                 n_subtokens: int) -> None:
        if not sources or len(set(sources)) != len(sources):
            raise ValueError(f"sources={list(sources)!r} must be a non-empty list of distinct names")
        self.sources = list(sources)
        n_sources = len(self.sources)
        self.n_routed_experts, self.n_subtokens = n_routed_experts, n_subtokens
        self.tokens = torch.zeros(n_sources, dtype=torch.float64)
        self.head_count = torch.zeros(n_layers, n_sources, n_heads, dtype=torch.float64)
        self.head_mass = torch.zeros(n_layers, n_sources, n_heads, dtype=torch.float64)
        self.expert_count: List[Optional[torch.Tensor]] = [None] * n_layers  # [sources, E_r] per layer
        self.expert_mass: List[Optional[torch.Tensor]] = [None] * n_layers

    def source_ids(self, source: Union[str, Sequence[str], torch.Tensor], batch: int) -> torch.Tensor:
        """``[batch]`` source indices from one name, one name per row, or indices."""
        if isinstance(source, str):
            source = [source] * batch
        if isinstance(source, torch.Tensor):
            ids = source.long().flatten().cpu()
        else:
            unknown = sorted({name for name in source if name not in self.sources})
            if unknown:
                raise ValueError(f"source(s) {unknown} are not among the declared sources {self.sources}")
            ids = torch.tensor([self.sources.index(name) for name in source], dtype=torch.long)
        if ids.numel() != batch:
            raise ValueError(f"got {ids.numel()} source labels for a batch of {batch} rows")
        if ids.numel() and (ids.min() < 0 or ids.max() >= len(self.sources)):
            raise ValueError(f"source indices must lie in 0..{len(self.sources) - 1}")
        return ids

    def add(self, routing: Sequence[LayerRouting], source_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Add one batch. ``routing``: records with ``[batch, seq, ...]`` tensors; ``source_ids [batch]``;
        ``mask [batch, seq]`` bool, true for real tokens (padding is multiplied out of every sum)."""
        n_sources = len(self.sources)
        device = routing[0].head_gates.device
        rows = torch.zeros(source_ids.numel(), n_sources, dtype=torch.float64, device=device)
        rows[torch.arange(source_ids.numel(), device=device), source_ids.to(device)] = 1.0  # [batch, sources]
        real = mask.to(device).double()  # [batch, seq]
        self.tokens += (rows.t() @ real.sum(1)).cpu()
        for layer, record in enumerate(routing):
            gates = record.head_gates.double() * real[..., None]  # [batch, seq, heads]
            self.head_count[layer] += (rows.t() @ ((gates > 0).double().sum(1))).cpu()
            self.head_mass[layer] += (rows.t() @ gates.sum(1)).cpu()
            if record.expert_indices is not None:
                self._add_experts(layer, record, rows, real)

    def _add_experts(self, layer: int, record: LayerRouting, rows: torch.Tensor, real: torch.Tensor) -> None:
        indices = record.expert_indices.long()  # [batch, seq, m, k]
        batch = indices.shape[0]
        one_hot = torch.zeros(*indices.shape, self.n_routed_experts, dtype=torch.float64, device=indices.device)
        one_hot.scatter_(-1, indices[..., None], 1.0)  # [batch, seq, m, k, E_r]
        one_hot *= real[:, :, None, None, None]
        counts = one_hot.reshape(batch, -1, self.n_routed_experts).sum(1)  # [batch, E_r]
        if self.expert_count[layer] is None:
            self.expert_count[layer] = torch.zeros(len(self.sources), self.n_routed_experts, dtype=torch.float64)
        self.expert_count[layer] += (rows.t() @ counts).cpu()
        if record.expert_weights is not None:
            weighted = (one_hot * record.expert_weights.double()[..., None]).reshape(batch, -1,
                                                                                    self.n_routed_experts).sum(1)
            if self.expert_mass[layer] is None:
                self.expert_mass[layer] = torch.zeros_like(self.expert_count[layer])
            self.expert_mass[layer] += (rows.t() @ weighted).cpu()

    def report(self) -> Dict[str, Any]:
        """``{"sources", "tokens": {source: n_s}, "layers": [{"layer", "heads", "experts"?}]}``;
        every per-node quantity is ``{source: [value per node]}`` (module docstring)."""
        named = lambda matrix: {s: [_number(v) for v in row] for s, row in zip(self.sources, matrix.tolist())}  # noqa: E731
        tokens = self.tokens[:, None]
        layers = []
        for layer in range(self.head_count.shape[0]):
            counts = self.head_count[layer]
            entry: Dict[str, Any] = {"layer": layer, "heads": {
                "activation_count": named(counts),
                "activation_frequency": named(_divide(counts, tokens)),
                "gate_mass": named(self.head_mass[layer]),
                "mean_gate": named(_divide(self.head_mass[layer], tokens)),
                "specialisation": named(specialisation(counts, self.tokens)),
            }}
            experts = self.expert_count[layer]
            if experts is not None:
                entry["experts"] = {
                    "assignment_count": named(experts),
                    "load": named(_divide(experts, experts.sum(1, keepdim=True))),
                    "activation_rate": named(_divide(experts, tokens * self.n_subtokens)),
                    "specialisation": named(specialisation(experts, self.tokens)),
                }
                if self.expert_mass[layer] is not None:
                    entry["experts"]["gate_mass"] = named(self.expert_mass[layer])
            layers.append(entry)
        return {"sources": list(self.sources),
                "tokens": {s: int(round(float(n))) for s, n in zip(self.sources, self.tokens)},
                "layers": layers}


def specialisation(counts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    r"""``counts [sources, nodes]``, ``tokens [sources]`` -> :math:`(N_{sx}/N_{\cdot x}) / (n_s/n)`
    ``[sources, nodes]`` (module docstring); ``nan`` (reported as ``None``) where undefined."""
    counts, tokens = counts.double(), tokens.double()
    node_share = counts / counts.sum(0, keepdim=True)  # nan for a node nobody chose
    source_share = tokens / tokens.sum()
    out = node_share / source_share[:, None]
    return torch.where(tokens[:, None] > 0, out, torch.full_like(out, float("nan")))


def _divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-300),
                       torch.full_like(numerator, float("nan")))


def _number(value: float) -> Optional[float]:
    """JSON has no NaN: an undefined value is ``None``."""
    return None if value != value else float(value)
