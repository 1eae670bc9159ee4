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

A Mixture-of-Recursions model returns one record per block *application* (``block_applications``
in the report says which block and recursion each is); every token is counted in every
application, the tokens that skipped a recursion included (their routing was computed, then
discarded). Its report gains a ``recursion`` section (:mod:`gohgraph.analysis.stats.recursion`).

Sections a model does not have are absent from the report, never zero-filled. Routing drift
between two checkpoints lives in :mod:`gohgraph.analysis.stats.drift`.

    stats = collect_routing_stats(model, eval_batches(corpus.val, 8, 256, max_batches=20))
    stats.to_json("stats.json"); stats.to_csv("stats.csv")
"""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Union

import torch

from ...config import GoHConfig
from ...graph import expert_graph, head_graph
from ...models.recursion import block_applications
from ...routing import LayerRouting, RecursionRouting
from .drift import routing_drift
from .metrics import coefficient_of_variation, load_balance_summary, load_entropy
from .recursion import RecursionTally
from .report import csv_rows, summarise_layers
from .tally import LayerTally
from .tokens import profile_fits

__all__ = ["RoutingStats", "collect_routing_stats", "routing_drift", "load_entropy",
           "coefficient_of_variation", "load_balance_summary"]


_CONFIG_FIELDS = ("n_layers", "n_heads", "n_shared_heads", "top_k_heads", "router", "router_rounds",
                  "head_graph", "inter_head_flow", "ffn", "n_experts", "n_shared_experts",
                  "top_k_experts", "n_subtokens", "capacity_factor", "expert_graph")


class RoutingStats:
    """Streaming per-layer routing statistics of a model described by ``config``.

    ``update(routing, input_ids=None)`` adds one batch: ``routing`` is ``out.routing`` (one
    :class:`LayerRouting` per layer, ``head_gates [batch, seq, heads]`` and the optional flow and
    expert fields). With ``input_ids [batch, seq]`` (given to every update) the report also lists
    each head's and expert's most frequent token ids (``top_tokens``, see
    :mod:`gohgraph.analysis.stats.tokens`; skipped for vocabularies too large to tabulate).
    Updates in any order and grouping give the same report (sums are float64).
    """

    def __init__(self, config: GoHConfig) -> None:
        self.config = config
        self.head_edges = head_graph(config.head_graph, config.n_heads) if config.router == "graph" \
            else torch.empty(2, 0, dtype=torch.long)
        self.batches = 0
        self.applications = block_applications(config)
        self.layers = [LayerTally(config, self.head_edges) for _ in self.applications]
        expert_nodes = config.n_routed_experts if config.ffn != "dense" else 0
        self.profile_tokens = profile_fits(config.vocab_size, config.n_heads + expert_nodes, len(self.layers))
        self.recursion = None
        if config.recursion == "mor":
            self.recursion = RecursionTally(config.max_recursions, config.vocab_size if self.profile_tokens else None)
        self._with_input_ids: Optional[bool] = None

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def update(self, routing: Sequence[LayerRouting], input_ids: Optional[torch.Tensor] = None,
               recursion: Optional[RecursionRouting] = None) -> None:
        """``recursion``: ``out.recursion`` of a Mixture-of-Recursions model (required for one)."""
        if len(routing) != len(self.layers):
            expected = (f"n_layers={self.config.n_layers}" if self.config.recursion != "mor" else
                        f"{len(self.layers)} block applications (n_layers={self.config.n_layers}, "
                        f"max_recursions={self.config.max_recursions}, {self.config.recursion_sharing})")
            raise ValueError(f"routing has {len(routing)} layer records but the config has {expected}")
        if (recursion is None) != (self.recursion is None):
            raise ValueError("pass out.recursion to update() exactly for a Mixture-of-Recursions model")
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
            if self.recursion is not None:
                self.recursion.add(recursion, input_ids)
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
        if self.recursion is not None:
            report["recursion"] = {"router": cfg.recursion_router, "sharing": cfg.recursion_sharing,
                                   "kv": cfg.recursion_kv, **self.recursion.report()}
            report["block_applications"] = [{"block": block, "recursion": r} for block, r in self.applications]
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
                out = model(input_ids.to(device))
                stats.update(out.routing, input_ids, recursion=out.recursion)
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
