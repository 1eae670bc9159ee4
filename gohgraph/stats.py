"""Routing statistics: head and expert load aggregated over a dataset, batch by batch.

:class:`RoutingStats` consumes the :class:`~gohgraph.routing.LayerRouting` records a model returns
and keeps only running sums and counts (float64), so any number of batches can stream through it
without holding them. :meth:`RoutingStats.report` turns the sums into, per layer:

* heads - hard counts (how often each head was active) kept apart from gate mass (how much weight
  it got), the co-activation matrix, the load over routed heads and its balance metrics;
* flow - the mean inter-head flow on every head-graph edge (graph router with flow only):
  ``mean_flow`` as recorded (the record zeroes inactive sources), ``mean_effective_flow`` counting
  only tokens whose destination head is active too (flow into a zero gate has no effect), and
  ``mean_flow_when_active``, the effective flow averaged over the tokens where both ends are active;
* experts - per-expert load (share of routed sub-token assignments), gate mass, balance metrics,
  the sub-token -> expert load, and drop rates (MoE layers only).

Sections a model does not have are absent from the report, never zero-filled. Routing drift
between two checkpoints lives in :mod:`gohgraph.stats_drift`.

    stats = collect_routing_stats(model, eval_batches(corpus.val, 8, 256, max_batches=20))
    stats.to_json("stats.json"); stats.to_csv("stats.csv")
"""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch

from .config import GoHConfig
from .graph import expert_graph, head_graph
from .routing import LayerRouting
from .stats_drift import routing_drift
from .stats_metrics import coefficient_of_variation, load_balance_summary, load_entropy
from .stats_report import csv_rows, summarise_layers
from .stats_tokens import TokenProfile, profile_fits

__all__ = ["RoutingStats", "collect_routing_stats", "routing_drift", "load_entropy",
           "coefficient_of_variation", "load_balance_summary"]


class RoutingStats:
    """Streaming per-layer routing statistics of a model described by ``config``.

    ``update(routing, input_ids=None)`` adds one batch: ``routing`` is ``out.routing`` (one
    :class:`LayerRouting` per layer, ``head_gates [batch, seq, heads]`` and the optional flow and
    expert fields). With ``input_ids [batch, seq]`` (given to every update) the report also lists
    each head's and expert's most frequent token ids (``top_tokens``, see
    :mod:`gohgraph.stats_tokens`; skipped for vocabularies too large to tabulate).
    Updates in any order and grouping give the same report (sums are float64).
    """

    def __init__(self, config: GoHConfig) -> None:
        self.config = config
        self.head_edges = head_graph(config.head_graph, config.n_heads) if config.router == "graph" \
            else torch.empty(2, 0, dtype=torch.long)
        self.batches = 0
        self.layers = [_LayerTally(config, self.head_edges) for _ in range(config.n_layers)]
        expert_nodes = config.n_routed_experts if config.ffn != "dense" else 0
        self.profile_tokens = profile_fits(config.vocab_size, config.n_heads + expert_nodes, config.n_layers)
        self._with_input_ids: Optional[bool] = None

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def update(self, routing: Sequence[LayerRouting], input_ids: Optional[torch.Tensor] = None) -> None:
        if len(routing) != self.config.n_layers:
            raise ValueError(f"routing has {len(routing)} layer records but the config has "
                             f"n_layers={self.config.n_layers}")
        if self._with_input_ids is not None and self._with_input_ids != (input_ids is not None):
            raise ValueError("pass input_ids to every update() or to none (token profiles would be partial)")
        if input_ids is not None and input_ids.numel() and self.profile_tokens and \
                (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in 0..{self.config.vocab_size - 1} (vocab_size)")
        # every record is checked before any is counted: a rejected batch leaves the sums untouched
        for layer_idx, (tally, record) in enumerate(zip(self.layers, routing)):
            if input_ids is not None and tuple(record.head_gates.shape[:2]) != tuple(input_ids.shape):
                raise ValueError(f"layer {layer_idx}: head_gates {list(record.head_gates.shape)} does not "
                                 f"match input_ids {list(input_ids.shape)} [batch, seq]")
            tally.check(record, layer_idx)
        self._with_input_ids = input_ids is not None
        with _serial_on_cpu(routing[0].head_gates.device if routing else None):
            for layer_idx, (tally, record) in enumerate(zip(self.layers, routing)):
                tally.add(record, input_ids if self.profile_tokens else None)
        self.batches += 1

    @property
    def tokens(self) -> int:
        return self.layers[0].tokens if self.layers else 0

    # ------------------------------------------------------------------ report
    def report(self) -> Dict[str, Any]:
        """Every statistic as plain JSON-ready Python values (see the module docstring)."""
        if self.tokens == 0:
            raise ValueError("RoutingStats has no routing records yet: call update() first")
        cfg = self.config
        layers = [tally.report(i, cfg) for i, tally in enumerate(self.layers)]
        report = {
            "tokens": self.tokens,
            "batches": self.batches,
            "config": {name: getattr(cfg, name) for name in _CONFIG_FIELDS},
            "head_edges": self.head_edges.t().tolist(),
            "layers": layers,
            "summary": summarise_layers(layers),
        }
        if any("experts" in layer for layer in layers):
            # [sub-token slot, routed expert] pairs a sub-token may be sent along
            report["expert_edges"] = expert_graph(cfg.expert_graph, cfg.n_subtokens,
                                                  cfg.n_routed_experts).t().tolist()
        return report

    def to_json(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report(), indent=2) + "\n", encoding="utf-8")
        return path

    def to_csv(self, path: Union[str, Path]) -> Path:
        """Long ("tidy") table: one row per ``layer, group, item, metric, value``.

        ``group`` is ``layer``, ``head``, ``head_pair`` (item ``"i&j"``), ``edge`` (item
        ``"src->dst"``), ``expert`` or ``subtoken_expert`` (item ``"s->e"``); per-layer scalars have
        an empty item. Loads into pandas with ``read_csv`` and pivots as needed.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["layer", "group", "item", "metric", "value"])
            writer.writerows(csv_rows(self.report()))
        return path


def collect_routing_stats(model: torch.nn.Module, batches: Iterable[torch.Tensor],
                          progress: bool = True) -> RoutingStats:
    """Run ``model`` (eval mode, no grad) over ``batches`` of ``input_ids [batch, seq]``.

    The model's training mode is restored afterwards. ``progress`` shows a tqdm bar.
    """
    from tqdm.auto import tqdm

    stats = RoutingStats(model.config)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for input_ids in tqdm(batches, desc="routing stats", unit="batch", disable=not progress):
                stats.update(model(input_ids.to(device)).routing, input_ids)
    finally:
        model.train(was_training)
    return stats


@contextlib.contextmanager
def _serial_on_cpu(device: Optional[torch.device]):
    """Run the bookkeeping on one CPU thread, then restore the thread count.

    The update is a few dozen small reductions; split over threads, each one waits for a second
    thread to be scheduled, and on a busy machine that wait (milliseconds per op, measured) costs
    more than the work itself. One thread does the whole update in about a millisecond per layer.
    """
    threads = torch.get_num_threads()
    if device is None or device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_CONFIG_FIELDS = ("n_layers", "n_heads", "n_shared_heads", "top_k_heads", "router", "router_rounds",
                  "head_graph", "inter_head_flow", "ffn", "n_experts", "n_shared_experts",
                  "top_k_experts", "n_subtokens", "capacity_factor", "expert_graph")


class _LayerTally:
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
        self.dropped_subtokens: Optional[float] = None
        self.expert_drop_count: Optional[torch.Tensor] = None  # [E_r]
        self._sections: Optional[tuple] = None
        self.vocab_size = cfg.vocab_size
        self.head_tokens: Optional[TokenProfile] = None  # [vocab, heads], with input_ids only
        self.expert_tokens: Optional[TokenProfile] = None  # [vocab, E_r]

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

    def add(self, record: LayerRouting, input_ids: Optional[torch.Tensor] = None) -> None:
        """Add a record that passed :meth:`check`."""
        self._sections = (record.flow is not None, record.expert_indices is not None,
                          record.expert_weights is not None, record.dropped is not None,
                          record.expert_drops is not None)
        # reduce on the records' device; only the small per-head sums travel to the CPU
        gates = record.head_gates.reshape(-1, record.head_gates.shape[-1]).double()
        active = (gates > 0).double()
        self.tokens += gates.shape[0]
        self.head_active_count += active.sum(0).cpu()
        self.head_gate_mass += gates.sum(0).cpu()
        self.head_coactivation += (active.t() @ active).cpu()
        if record.flow is not None:
            self._add_flow(record.flow, active)
        if record.expert_indices is not None:
            self._add_experts(record)
        if input_ids is not None:
            self._add_token_profiles(record, input_ids)

    def _add_token_profiles(self, record: LayerRouting, input_ids: torch.Tensor) -> None:
        heads = record.head_gates.shape[-1]
        if self.head_tokens is None:
            self.head_tokens = TokenProfile(self.vocab_size, heads)
        head_ids = torch.arange(heads, device=record.head_gates.device).expand_as(record.head_gates)
        self.head_tokens.add(input_ids, head_ids, mask=record.head_gates > 0)
        if record.expert_indices is not None:
            if self.expert_tokens is None:
                self.expert_tokens = TokenProfile(self.vocab_size, self.n_routed_experts)
            self.expert_tokens.add(input_ids, record.expert_indices)

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
        flat = indices.reshape(-1)
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
        return out

    def _head_report(self, cfg: GoHConfig) -> Dict[str, Any]:
        tokens = self.tokens
        heads = {
            "activation_count": _ints(self.head_active_count),
            "activation_frequency": _floats(self.head_active_count / tokens),
            "gate_mass": _floats(self.head_gate_mass),
            "mean_gate": _floats(self.head_gate_mass / tokens),
            "coactivation": [_floats(row) for row in self.head_coactivation / tokens],
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
        if self.expert_tokens is not None:
            experts["top_tokens"] = self.expert_tokens.top_tokens()
        if self.dropped_subtokens is not None:
            experts["drop_rate"] = self.dropped_subtokens / (self.tokens * self.n_subtokens)
        if self.expert_drop_count is not None:
            experts["assignment_drop_rate"] = float(self.expert_drop_count.sum() / assignments)
            experts["expert_drop_rate"] = _floats(self.expert_drop_count / self.expert_count.clamp(min=1))
        return experts


def _floats(values: torch.Tensor) -> List[float]:
    return [float(v) for v in values.tolist()]


def _ints(values: torch.Tensor) -> List[int]:
    return [int(round(v)) for v in values.tolist()]
