"""Running float64 sums of one layer's routing records: the state behind :class:`RoutingStats`."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from ...config import GoHConfig
from ...routing import LayerRouting
from .coactivation import conditional_coactivation, expert_selection, selection_counts
from .metrics import load_balance_summary
from .tokens import TokenProfile


class LayerTally:
    """Running float64 sums of one layer; which optional sections exist is fixed by the first batch."""

    def __init__(self, cfg: GoHConfig, head_edges: torch.Tensor) -> None:
        heads = cfg.n_heads
        self.head_edges, self.n_head_edges = head_edges, head_edges.shape[1]
        self.n_routed_experts, self.n_subtokens = cfg.n_routed_experts, cfg.n_subtokens
        self.tokens = 0
        self.head_active_count = torch.zeros(heads, dtype=torch.float64)
        self.head_gate_mass = torch.zeros(heads, dtype=torch.float64)
        self.head_coactivation = torch.zeros(heads, heads, dtype=torch.float64)
        self.flow_sum: Optional[torch.Tensor] = None  # [n_head_edges], as recorded
        self.effective_flow_sum: Optional[torch.Tensor] = None  # only where the destination is active
        self.expert_count: Optional[torch.Tensor] = None  # [E_r] routed assignments
        self.expert_gate_mass: Optional[torch.Tensor] = None  # [E_r]
        self.subtoken_expert_count: Optional[torch.Tensor] = None  # [m, E_r]
        self.expert_coactivation: Optional[torch.Tensor] = None  # [E_r, E_r] joint counts over sub-tokens
        self.dropped_subtokens: Optional[float] = None
        self.expert_drop_count: Optional[torch.Tensor] = None  # [E_r]
        self._sections: Optional[tuple] = None
        self.vocab_size = cfg.vocab_size
        self.head_tokens: Optional[TokenProfile] = None  # [vocab, heads], with input_ids only
        self.expert_tokens: Optional[TokenProfile] = None  # [vocab, E_r]
        # the same, keyed by the token the model predicts at the position (vocabulary specialisation)
        self.predicted_head_tokens: Optional[TokenProfile] = None
        self.predicted_expert_tokens: Optional[TokenProfile] = None
        # SwitchHead: choices per head and expert, value and output side ([heads, E] each)
        self.attention_expert_count: Dict[str, torch.Tensor] = {}
        self.n_attention_experts = cfg.n_attention_experts
        # MoSA: tokens each sparse head kept, and the router score mass on them ([sparse heads])
        self.sparse_kept_count: Optional[torch.Tensor] = None
        self.sparse_kept_score: Optional[torch.Tensor] = None

    def check(self, record: LayerRouting, layer_idx: int) -> None:
        """Raise ``ValueError`` if ``record`` does not fit this layer or differs from earlier batches."""
        sections = (record.flow is not None, record.expert_indices is not None, record.expert_weights is not None,
                    record.dropped is not None, record.expert_drops is not None)
        if self._sections is not None and sections != self._sections:
            names = ("flow", "expert_indices", "expert_weights", "dropped", "expert_drops")
            raise ValueError(f"layer {layer_idx}: this record's fields {dict(zip(names, sections))} differ "
                             f"from earlier batches' {dict(zip(names, self._sections))}")
        heads = record.head_gates.shape[-1]
        if heads != self.head_active_count.numel():
            raise ValueError(f"layer {layer_idx}: head_gates has {heads} heads, "
                             f"config n_heads={self.head_active_count.numel()}")
        if record.flow is not None and record.flow.shape[-1] != self.n_head_edges:
            raise ValueError(f"layer {layer_idx}: flow has {record.flow.shape[-1]} edges, the config's "
                             f"head_graph has {self.n_head_edges}")
        if record.expert_indices is not None:
            indices, n_experts, m = record.expert_indices, self.n_routed_experts, self.n_subtokens
            if indices.dim() != 4 or indices.shape[2] != m:
                raise ValueError(f"layer {layer_idx}: expert_indices must be [batch, seq, n_subtokens={m}, k], "
                                 f"got {list(indices.shape)}")
            if indices.numel() and (indices.min() < 0 or indices.max() >= n_experts):
                raise ValueError(f"layer {layer_idx}: expert_indices must lie in 0..{n_experts - 1} "
                                 f"(n_routed_experts), got {int(indices.min())}..{int(indices.max())}")

    def add(self, record: LayerRouting, input_ids: Optional[torch.Tensor] = None,
            predicted_ids: Optional[torch.Tensor] = None) -> None:
        """Add a record that passed :meth:`check`; ``predicted_ids [batch, seq]``: the model's
        predicted next token at each position, for the vocabulary specialisation by prediction."""
        self._sections = (record.flow is not None, record.expert_indices is not None,
                          record.expert_weights is not None, record.dropped is not None,
                          record.expert_drops is not None)
        # reduce on the records' device; only the small per-head sums travel to the CPU
        gates = record.head_gates.reshape(-1, record.head_gates.shape[-1]).double()
        active = (gates > 0).double()
        self.tokens += gates.shape[0]
        self.head_active_count += active.sum(0).cpu()
        self.head_gate_mass += gates.sum(0).cpu()
        self.head_coactivation += selection_counts(active).cpu()
        if record.flow is not None:
            self._add_flow(record.flow, active)
        if record.expert_indices is not None:
            self._add_experts(record)
        if input_ids is not None:
            self.head_tokens, self.expert_tokens = self._add_token_profiles(
                record, input_ids, self.head_tokens, self.expert_tokens)
        if predicted_ids is not None:
            self.predicted_head_tokens, self.predicted_expert_tokens = self._add_token_profiles(
                record, predicted_ids, self.predicted_head_tokens, self.predicted_expert_tokens)
        for side, choices in (("value", record.value_experts), ("output", record.output_experts)):
            if choices is not None:
                self._add_attention_experts(side, choices.expert_indices)
        if record.sparse_heads is not None:
            self._add_sparse_heads(record.sparse_heads.selected, record.sparse_heads.scores)

    def _add_attention_experts(self, side: str, indices: torch.Tensor) -> None:
        """SwitchHead's ``indices [batch, len, heads, k]`` (each head's own experts ``0..E-1``)."""
        heads, n_experts = indices.shape[2], self.n_attention_experts
        per_head = indices.long().movedim(2, 0).reshape(heads, -1)  # [heads, choices]
        flat = per_head + torch.arange(heads, device=indices.device)[:, None] * n_experts
        count = torch.bincount(flat.reshape(-1), minlength=heads * n_experts).view(heads, n_experts).double().cpu()
        previous = self.attention_expert_count.get(side)
        self.attention_expert_count[side] = count if previous is None else previous + count

    def _add_sparse_heads(self, selected: torch.Tensor, scores: torch.Tensor) -> None:
        """MoSA's ``selected [batch, seq, sparse heads]`` and ``scores`` of the same shape."""
        kept = selected.reshape(-1, selected.shape[-1]).double()
        kept_score = (scores.reshape(-1, scores.shape[-1]).double() * kept).sum(0).cpu()
        if self.sparse_kept_count is None:
            self.sparse_kept_count = torch.zeros(kept.shape[-1], dtype=torch.float64)
            self.sparse_kept_score = torch.zeros(kept.shape[-1], dtype=torch.float64)
        self.sparse_kept_count += kept.sum(0).cpu()
        self.sparse_kept_score += kept_score

    def _add_token_profiles(self, record: LayerRouting, token_ids: torch.Tensor, head_tokens: Optional[TokenProfile],
                            expert_tokens: Optional[TokenProfile]) -> tuple:
        """Count ``token_ids [batch, seq]`` against the active heads and the chosen experts; returns
        the (created on first use) head and expert profiles."""
        heads = record.head_gates.shape[-1]
        if head_tokens is None:
            head_tokens = TokenProfile(self.vocab_size, heads)
        head_ids = torch.arange(heads, device=record.head_gates.device).expand_as(record.head_gates)
        head_tokens.add(token_ids, head_ids, mask=record.head_gates > 0)
        if record.expert_indices is not None:
            if expert_tokens is None:
                expert_tokens = TokenProfile(self.vocab_size, self.n_routed_experts)
            expert_tokens.add(token_ids, record.expert_indices)
        return head_tokens, expert_tokens

    def _add_flow(self, flow: torch.Tensor, active: torch.Tensor) -> None:
        flow = flow.reshape(-1, flow.shape[-1]).double()
        if self.flow_sum is None:
            self.flow_sum = torch.zeros(self.n_head_edges, dtype=torch.float64)
            self.effective_flow_sum = torch.zeros(self.n_head_edges, dtype=torch.float64)
        self.flow_sum += flow.sum(0).cpu()
        # flow into an inactive head is computed but multiplied by a zero gate: it has no effect
        self.effective_flow_sum += (flow * active[:, self.head_edges[1].to(flow.device)]).sum(0).cpu()

    def _add_experts(self, record: LayerRouting) -> None:
        n_experts, m = self.n_routed_experts, self.n_subtokens
        indices = record.expert_indices.long()  # [batch, seq, m, k]
        if self.expert_count is None:
            self.expert_count = torch.zeros(n_experts, dtype=torch.float64)
            self.subtoken_expert_count = torch.zeros(m, n_experts, dtype=torch.float64)
            self.expert_coactivation = torch.zeros(n_experts, n_experts, dtype=torch.float64)
        flat = indices.reshape(-1)
        self.expert_coactivation += selection_counts(expert_selection(indices, n_experts)).cpu()
        self.expert_count += torch.bincount(flat, minlength=n_experts).double().cpu()
        if record.expert_weights is not None:
            if self.expert_gate_mass is None:
                self.expert_gate_mass = torch.zeros(n_experts, dtype=torch.float64)
            weights = record.expert_weights.reshape(-1).double()
            self.expert_gate_mass += torch.bincount(flat, weights=weights, minlength=n_experts).cpu()
        subtoken = torch.arange(m, device=indices.device).view(1, 1, m, 1).expand_as(indices).reshape(-1)
        self.subtoken_expert_count += torch.bincount(subtoken * n_experts + flat,
                                                     minlength=m * n_experts).double().view(m, n_experts).cpu()
        if record.dropped is not None:
            self.dropped_subtokens = (self.dropped_subtokens or 0.0) + float(record.dropped.sum())
        if record.expert_drops is not None:
            if self.expert_drop_count is None:
                self.expert_drop_count = torch.zeros(n_experts, dtype=torch.float64)
            drops = record.expert_drops.reshape(-1).bool()
            self.expert_drop_count += torch.bincount(flat[drops], minlength=n_experts).double().cpu()

    # ------------------------------------------------------------------ report
    def report(self, layer_idx: int, cfg: GoHConfig) -> Dict[str, Any]:
        out: Dict[str, Any] = {"layer": layer_idx, "tokens": self.tokens, "heads": self._head_report(cfg)}
        if self.flow_sum is not None:
            src, dst = self.head_edges
            both_active = self.head_coactivation[src, dst]
            out["flow"] = {
                "mean_flow": _floats(self.flow_sum / self.tokens),
                "mean_effective_flow": _floats(self.effective_flow_sum / self.tokens),
                "mean_flow_when_active": _floats(self.effective_flow_sum / both_active.clamp(min=1)),
            }
        if self.expert_count is not None:
            out["experts"] = self._expert_report()
        if self.attention_expert_count:
            out["attention_experts"] = {side: _attention_expert_report(count)
                                        for side, count in self.attention_expert_count.items()}
        if self.sparse_kept_count is not None:
            out["sparse_heads"] = {
                "kept_count": _ints(self.sparse_kept_count),
                "kept_share": _floats(self.sparse_kept_count / max(self.tokens, 1)),
                "mean_score_kept": _floats(self.sparse_kept_score / self.sparse_kept_count.clamp(min=1)),
            }
        return out

    def _head_report(self, cfg: GoHConfig) -> Dict[str, Any]:
        tokens = self.tokens
        heads = {
            "activation_count": _ints(self.head_active_count),
            "activation_frequency": _floats(self.head_active_count / tokens),
            "gate_mass": _floats(self.head_gate_mass),
            "mean_gate": _floats(self.head_gate_mass / tokens),
            "coactivation": [_floats(row) for row in self.head_coactivation / tokens],
            "coactivation_given": conditional_coactivation(self.head_coactivation),  # P(b | a)
            "active_per_token": float(self.head_active_count.sum() / tokens),
            "dead": [int(i) for i in torch.nonzero(self.head_active_count == 0).flatten().tolist()],
        }
        if self.head_tokens is not None:
            heads["top_tokens"] = self.head_tokens.top_tokens()
        routed_count = self.head_active_count[cfg.n_shared_heads:]
        if routed_count.numel() and routed_count.sum() > 0:
            heads["routed_load"] = _floats(routed_count / routed_count.sum())
            balance = load_balance_summary(routed_count)
            balance["dead"] = [cfg.n_shared_heads + i for i in balance["dead"]]  # ids among all heads
            heads.update({key: value for key, value in balance.items() if key != "dead"})
            heads["dead_routed"] = balance["dead"]
        return heads

    def _expert_report(self) -> Dict[str, Any]:
        assignments = float(self.expert_count.sum())
        n_experts = self.expert_count.numel()
        load = self.expert_count / assignments
        experts: Dict[str, Any] = {
            "assignments": int(assignments),
            "assignment_count": _ints(self.expert_count),
            "load": _floats(load),
            "utilisation": _floats(load * n_experts),  # load over the ideal load 1/E_r
            **load_balance_summary(self.expert_count),
        }
        if self.expert_gate_mass is not None:
            experts["gate_mass"] = _floats(self.expert_gate_mass)
            experts["weight_share"] = _floats(self.expert_gate_mass / self.expert_gate_mass.sum().clamp(min=1e-300))
        per_subtoken = self.subtoken_expert_count.sum(1, keepdim=True).clamp(min=1)
        experts["subtoken_load"] = [_floats(row) for row in self.subtoken_expert_count / per_subtoken]
        # per sub-token decision: P(a and b), and P(b | a) (gohgraph.analysis.stats.coactivation)
        experts["coactivation"] = [_floats(row) for row in self.expert_coactivation / (self.tokens * self.n_subtokens)]
        experts["coactivation_given"] = conditional_coactivation(self.expert_coactivation)
        if self.expert_tokens is not None:
            experts["top_tokens"] = self.expert_tokens.top_tokens()
        if self.dropped_subtokens is not None:
            experts["drop_rate"] = self.dropped_subtokens / (self.tokens * self.n_subtokens)
        if self.expert_drop_count is not None:
            experts["assignment_drop_rate"] = float(self.expert_drop_count.sum() / assignments)
            experts["expert_drop_rate"] = _floats(self.expert_drop_count / self.expert_count.clamp(min=1))
        return experts


def _attention_expert_report(count: torch.Tensor) -> Dict[str, Any]:
    """Per head: choices of each expert (``count [heads, E]``), their share of the head's choices,
    and the coefficient of variation of that load (0: every expert chosen equally)."""
    share = count / count.sum(1, keepdim=True).clamp(min=1)
    mean = share.mean(1, keepdim=True)
    cv = share.std(1, unbiased=False, keepdim=True) / mean.clamp(min=1e-300)
    return {"assignment_count": [_ints(row) for row in count], "load": [_floats(row) for row in share],
            "load_cv": _floats(cv.squeeze(1))}


def _floats(values: torch.Tensor) -> List[float]:
    return [float(v) for v in values.tolist()]


def _ints(values: torch.Tensor) -> List[int]:
    return [int(round(v)) for v in values.tolist()]
