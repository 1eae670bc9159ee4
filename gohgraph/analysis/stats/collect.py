"""Routing statistics: head and expert load aggregated over a dataset, batch by batch.

:class:`RoutingStats` consumes the :class:`~gohgraph.routing.LayerRouting` records a model returns
and keeps only running sums and counts (float64), so any number of batches can stream through it
without holding them. :meth:`RoutingStats.report` turns the sums into, per layer:

* heads - hard counts (how often each head was active) kept apart from gate mass (how much weight
  it got), the co-activation matrix and its conditional form P(b | a)
  (:mod:`~gohgraph.analysis.stats.coactivation`; experts likewise, per sub-token decision), the load over routed heads and its balance metrics;
* flow - the mean inter-head flow on every head-graph edge (graph router with flow only):
  ``mean_flow`` as recorded (the record zeroes inactive sources), ``mean_effective_flow`` counting
  only tokens whose destination head is active too (flow into a zero gate has no effect), and
  ``mean_flow_when_active``, the effective flow averaged over the tokens where both ends are active;
* experts - per-expert load (share of routed sub-token assignments), gate mass, balance metrics,
  the sub-token -> expert load, and drop rates (MoE layers only);
* token_entropy - per token id, the entropy of its routing (with ``input_ids``;
  :mod:`~gohgraph.analysis.stats.token_entropy`).

``vocabulary`` (with ``input_ids``) holds the vocabulary specialisation of every layer: per input
token id, and with ``predicted_ids`` per predicted next token, the unit it routes to most and how
concentrated it is, and each unit's most specialised token ids
(:mod:`~gohgraph.analysis.stats.vocabulary`). Its tables follow the token profiles' memory bound
(:mod:`~gohgraph.analysis.stats.tokens`); the ones keyed by prediction count twice against it.

Across layers: ``cross_layer`` holds the co-occurrence of heads and of experts between consecutive
layers and the routing consistency (:mod:`~gohgraph.analysis.stats.cross_layer`), and
``summary.load_percentiles`` the percentiles of load per layer and across layers
(:mod:`~gohgraph.analysis.stats.percentiles`). Built with ``sources=[...]`` and given each batch's
``source``, ``by_source`` reports routing per data source with a specialisation score per head and
expert (:mod:`~gohgraph.analysis.stats.by_source`). With an ``attention_mask``, padding is dropped
before anything is counted (:mod:`~gohgraph.analysis.stats.padding`).

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
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch

from ...config import GoHConfig
from ...graph import expert_graph, head_graph
from ...models.families import family_of
from ...models.recursion import block_applications
from ...routing import LayerRouting, RecursionRouting
from ...storage import write_json
from .by_source import SourceTally
from .cross_layer import CrossLayerTally
from .drift import routing_drift
from .metrics import coefficient_of_variation, load_balance_summary, load_entropy
from .padding import check_attention_mask, ids_without_padding, without_padding
from .percentiles import load_percentiles
from .recursion import RecursionTally
from .report import csv_rows, summarise_layers
from .tally import LayerTally
from .token_entropy import token_entropy_report
from .tokens import profile_fits
from .vocabulary import MIN_OCCURRENCES, vocabulary_layer

__all__ = ["RoutingStats", "collect_routing_stats", "collect_routing_stats_by_source", "routing_by_source",
           "routing_drift", "load_entropy", "coefficient_of_variation", "load_balance_summary"]


_CONFIG_FIELDS = ("n_layers", "n_heads", "n_shared_heads", "top_k_heads", "router", "router_rounds",
                  "head_graph", "inter_head_flow", "ffn", "n_experts", "n_shared_experts",
                  "top_k_experts", "n_subtokens", "capacity_factor", "expert_graph",
                  "n_attention_experts", "top_k_attention_experts", "n_mosa_heads", "mosa_sparsity")


class RoutingStats:
    """Streaming per-layer routing statistics of a model described by ``config``.

    ``update(routing, input_ids=None, attention_mask=None, source=None)`` adds one batch:
    ``routing`` is ``out.routing`` (one :class:`LayerRouting` per layer, ``head_gates [batch, seq,
    heads]`` and the optional flow and expert fields). With ``input_ids [batch, seq]`` (given to
    every update) the report also lists each head's and expert's most frequent token ids
    (``top_tokens``, see :mod:`gohgraph.analysis.stats.tokens`) and each token id's routing entropy
    (skipped for vocabularies too large to tabulate). ``attention_mask [batch, seq]`` (1 = token,
    0 = padding) keeps padding out of every number. With ``sources`` (names) every update names
    its rows' ``source``: one name for the batch, a name per row, or ``[batch]`` indices.
    Updates in any order and grouping give the same report (sums are float64).
    """

    def __init__(self, config: GoHConfig, sources: Optional[Sequence[str]] = None,
                 min_occurrences: int = MIN_OCCURRENCES) -> None:
        if isinstance(min_occurrences, bool) or not isinstance(min_occurrences, int) or min_occurrences < 1:
            raise ValueError(f"min_occurrences={min_occurrences!r} must be an int >= 1")
        self.config = config
        self.min_occurrences = min_occurrences  # for the vocabulary section's top_tokens
        self.head_edges = head_graph(config.head_graph, config.n_heads) if config.router == "graph" \
            else torch.empty(2, 0, dtype=torch.long)
        self.batches = 0
        self.applications = block_applications(config)
        self.layers = [LayerTally(config, self.head_edges) for _ in self.applications]
        expert_nodes = config.n_routed_experts if config.ffn != "dense" else 0
        self.profile_tokens = profile_fits(config.vocab_size, config.n_heads + expert_nodes, len(self.layers))
        # tables keyed by the predicted token double the memory: kept under the same bound, together
        self.profile_predictions = profile_fits(config.vocab_size, 2 * (config.n_heads + expert_nodes),
                                                len(self.layers))
        self.recursion = None
        if config.recursion == "mor":
            self.recursion = RecursionTally(config.max_recursions, config.vocab_size if self.profile_tokens else None)
        self._with_input_ids: Optional[bool] = None
        self._with_predicted_ids: Optional[bool] = None
        self.cross_layer = CrossLayerTally(len(self.layers), config.n_heads, config.n_shared_heads,
                                           config.n_routed_experts)
        self.token_occurrences = torch.zeros(config.vocab_size if self.profile_tokens else 0, dtype=torch.float64)
        self.predicted_occurrences = torch.zeros_like(self.token_occurrences)
        self.by_source = None if sources is None else SourceTally(
            list(sources), config.n_layers, config.n_heads, config.n_routed_experts, config.n_subtokens)

    # ------------------------------------------------------------------ accumulation
    def check(self, routing: Sequence[LayerRouting], input_ids: Optional[torch.Tensor] = None,
              attention_mask: Optional[torch.Tensor] = None,
              source: Union[None, str, Sequence[str], torch.Tensor] = None,
              recursion: Optional[RecursionRouting] = None,
              predicted_ids: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Raise ``ValueError`` if :meth:`update` would refuse this batch, counting nothing; returns
        the bool ``[batch, seq]`` mask (``None`` without one). Lets a caller holding several
        statistics check a batch against all of them before any counts it."""
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
        if predicted_ids is not None:
            if input_ids is None or tuple(predicted_ids.shape) != tuple(input_ids.shape):
                raise ValueError("predicted_ids needs input_ids of the same [batch, seq] shape, got "
                                 f"{list(predicted_ids.shape)} and "
                                 f"{None if input_ids is None else list(input_ids.shape)}")
            if predicted_ids.numel() and (predicted_ids.min() < 0 or predicted_ids.max() >= self.config.vocab_size):
                raise ValueError(f"predicted_ids must lie in 0..{self.config.vocab_size - 1} (vocab_size)")
        if self._with_predicted_ids is not None and self._with_predicted_ids != (predicted_ids is not None):
            raise ValueError("pass predicted_ids to every update() or to none (the vocabulary by prediction "
                             "would be partial)")
        # every record is checked before any is counted: a rejected batch leaves the sums untouched
        for layer_idx, (tally, record) in enumerate(zip(self.layers, routing)):
            if input_ids is not None and tuple(record.head_gates.shape[:2]) != tuple(input_ids.shape):
                raise ValueError(f"layer {layer_idx}: head_gates {list(record.head_gates.shape)} does not "
                                 f"match input_ids {list(input_ids.shape)} [batch, seq]")
            tally.check(record, layer_idx)
        shape = tuple(routing[0].head_gates.shape[:2])
        mask = None if attention_mask is None else check_attention_mask(attention_mask, shape)
        if (source is None) != (self.by_source is None):
            raise ValueError("pass source= to update() exactly when RoutingStats was built with sources=[...]"
                             if source is None else "source= needs RoutingStats(config, sources=[names])")
        return mask

    @torch.no_grad()
    def update(self, routing: Sequence[LayerRouting], input_ids: Optional[torch.Tensor] = None,
               attention_mask: Optional[torch.Tensor] = None,
               source: Union[None, str, Sequence[str], torch.Tensor] = None,
               recursion: Optional[RecursionRouting] = None, predicted_ids: Optional[torch.Tensor] = None) -> None:
        """``recursion``: ``out.recursion`` of a Mixture-of-Recursions model (required for one);
        ``predicted_ids [batch, seq]``: the model's predicted next token at each position
        (``out.logits.argmax(-1)``), for the vocabulary specialisation by prediction."""
        mask = self.check(routing, input_ids, attention_mask, source, recursion, predicted_ids)
        shape = tuple(routing[0].head_gates.shape[:2])
        source_ids = None if source is None else self.by_source.source_ids(source, shape[0])
        self._with_input_ids = input_ids is not None
        self._with_predicted_ids = predicted_ids is not None
        with _serial_on_cpu(routing[0].head_gates.device if routing else None):
            if source_ids is not None:
                self.by_source.add(routing, source_ids, mask if mask is not None else
                                   torch.ones(shape, dtype=torch.bool))
            if self.recursion is not None:  # per-token depths of the batch as given
                self.recursion.add(recursion, input_ids)
            routing = [without_padding(record, mask) for record in routing]
            input_ids = ids_without_padding(input_ids, mask)
            predicted_ids = ids_without_padding(predicted_ids, mask) if self.profile_predictions else None
            for layer_idx, (tally, record) in enumerate(zip(self.layers, routing)):
                tally.add(record, input_ids if self.profile_tokens else None, predicted_ids)
            self.cross_layer.add(routing)
            if input_ids is not None and self.profile_tokens:
                self.token_occurrences += torch.bincount(input_ids.reshape(-1).long().cpu(),
                                                         minlength=self.config.vocab_size).double()
            if predicted_ids is not None:
                self.predicted_occurrences += torch.bincount(predicted_ids.reshape(-1).long().cpu(),
                                                             minlength=self.config.vocab_size).double()
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
        for layer, tally in zip(layers, self.layers):
            if tally.head_tokens is not None:
                layer["token_entropy"] = token_entropy_report(
                    self.token_occurrences, tally.head_tokens.counts[:, cfg.n_shared_heads:],
                    None if tally.expert_tokens is None else tally.expert_tokens.counts)
        report = {
            "tokens": self.tokens,
            "batches": self.batches,
            "config": {name: getattr(cfg, name) for name in _CONFIG_FIELDS},
            "head_edges": self.head_edges.t().tolist(),
            "layers": layers,
            "cross_layer": self.cross_layer.report(),
            "summary": {**summarise_layers(layers), "load_percentiles": load_percentiles(layers, cfg.n_shared_heads)},
        }
        if not family_of(cfg).is_default:  # an encoder's (or a seq2seq kind's); decoder reports stay as they were
            report["config"]["model_type"] = cfg.model_type
        if self.by_source is not None:
            report["by_source"] = self.by_source.report()
        if any(tally.head_tokens is not None for tally in self.layers):
            report["vocabulary"] = self.vocabulary_report()
        if self.recursion is not None:
            report["recursion"] = {"router": cfg.recursion_router, "sharing": cfg.recursion_sharing,
                                   "kv": cfg.recursion_kv, **self.recursion.report()}
            report["block_applications"] = [{"block": block, "recursion": r} for block, r in self.applications]
        if any("experts" in layer for layer in layers):
            # [sub-token slot, routed expert] pairs a sub-token may be sent along
            report["expert_edges"] = expert_graph(cfg.expert_graph, cfg.n_subtokens,
                                                  cfg.n_routed_experts).t().tolist()
        return report

    def vocabulary_report(self) -> Dict[str, Any]:
        """The ``vocabulary`` section (:mod:`~gohgraph.analysis.stats.vocabulary`): per layer, by input
        token and (when ``predicted_ids`` were given) by predicted token, for routed heads and experts."""
        cfg = self.config
        occurrences = {"input": self.token_occurrences, "predicted": self.predicted_occurrences}
        layers = []
        for layer_idx, tally in enumerate(self.layers):
            head_counts = {"input": _counts(tally.head_tokens), "predicted": _counts(tally.predicted_head_tokens)}
            expert_counts = {"input": _counts(tally.expert_tokens),
                             "predicted": _counts(tally.predicted_expert_tokens)}
            layers.append({"layer": layer_idx, **vocabulary_layer(occurrences, head_counts, expert_counts,
                                                                  cfg.n_shared_heads, cfg.n_subtokens,
                                                                  self.min_occurrences)})
        return {"min_occurrences": self.min_occurrences, "layers": layers}

    def to_json(self, path: Union[str, Path]) -> Path:
        return write_json(path, self.report())

    def to_csv(self, path: Union[str, Path]) -> Path:
        """Long ("tidy") table: one row per ``layer, group, item, metric, value``.

        ``group`` is ``layer``, ``head``, ``head_pair`` / ``expert_pair`` (item ``"a&b"``, metrics
        ``coactivation`` and ``coactivation_given`` = P(b | a)), ``edge`` (item
        ``"src->dst"``), ``expert`` or ``subtoken_expert`` (item ``"s->e"``); per-layer scalars have
        an empty item. The newer sections add ``token`` (item = token id), ``cross_layer_heads`` /
        ``cross_layer_experts`` (``layer`` = the pair's first layer, item ``"i->j"``),
        ``load_percentile`` (``layer`` = ``all`` across layers) and, by source, ``source``,
        ``source_head`` and ``source_expert`` (item ``"source:node"``). Loads into pandas with ``read_csv`` and pivots as needed.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["layer", "group", "item", "metric", "value"])
            writer.writerows(csv_rows(self.report()))
        return path


def _counts(profile) -> Optional[torch.Tensor]:
    return None if profile is None else profile.counts


Batch = Union[torch.Tensor, Tuple[torch.Tensor, Optional[torch.Tensor]]]


def collect_routing_stats(model: torch.nn.Module, batches: Iterable[Batch],
                          progress: bool = True) -> RoutingStats:
    """Run ``model`` (eval mode, no grad) over ``batches`` of ``input_ids [batch, seq]``, or of
    ``(input_ids, attention_mask)`` pairs (padding is then masked in the model and left out of
    every statistic). The model's training mode is restored afterwards. ``progress`` shows a tqdm bar.
    """
    if family_of(model.config).several_routing_kinds:
        raise ValueError("a seq2seq model routes three attention kinds: use "
                         "gohgraph.analysis.stats.kinds.collect_routing_stats_by_kind")
    stats = RoutingStats(model.config)
    _run(model, stats, ((batch, None) for batch in batches), progress)
    return stats


def collect_routing_stats_by_source(model: torch.nn.Module, batches_by_source: Mapping[str, Iterable[Batch]],
                                    progress: bool = True) -> RoutingStats:
    """:func:`collect_routing_stats` over several sources, ``{name: batches}``; the report's
    ``by_source`` section splits every count by source (:mod:`~gohgraph.analysis.stats.by_source`),
    the rest pools all sources."""
    if not batches_by_source:
        raise ValueError("batches_by_source names no source")
    stats = RoutingStats(model.config, sources=list(batches_by_source))
    pairs = ((batch, name) for name, batches in batches_by_source.items() for batch in batches)
    _run(model, stats, pairs, progress)
    return stats


def routing_by_source(model: torch.nn.Module, batches_by_source: Mapping[str, Iterable[Batch]],
                      progress: bool = False) -> Dict[str, Any]:
    """The ``by_source`` report alone: per source and layer, head activation, gate mass, expert
    load and the specialisation score of every head and expert (see
    :mod:`~gohgraph.analysis.stats.by_source` for the definitions)."""
    return collect_routing_stats_by_source(model, batches_by_source, progress).report()["by_source"]


def _run(model: torch.nn.Module, stats: RoutingStats, batches: Iterable[Tuple[Batch, Optional[str]]],
         progress: bool) -> None:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch, source in tqdm(batches, desc="routing stats", unit="batch", disable=not progress):
                input_ids, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
                out = model(input_ids.to(device), attention_mask=None if mask is None else mask.to(device))
                # a next-token prediction at each position keys the vocabulary specialisation by output
                predicted = out.logits.argmax(-1) if family_of(model.config).predicts_next_token else None
                stats.update(out.routing, input_ids, attention_mask=mask, source=source,
                             recursion=getattr(out, "recursion", None), predicted_ids=predicted)
    finally:
        model.train(was_training)


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
