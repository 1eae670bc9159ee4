r"""Causal routing analyses (docs/analysis.md): what a head, an expert or the router's messages are worth.

Every analysis is the change of the validation loss under one intervention,
:math:`\Delta = L_{\text{intervened}} - L_{\text{baseline}}` (nats per token, positive: the model
gets worse without it), and the share of routing decisions that change. Interventions are context
managers that set an analysis attribute on the routing modules and restore it on exit; no weight is
edited:

* :func:`heads_forced` - a head forced **off** (gate 0 and inactive for every token: its output and
  what it sends along the inter-head flow are gone; the other heads keep their gates, nothing is
  renormalised or re-routed, exactly a knock-out) or forced **on** (gate 1 and active for every
  token, the gate a shared head gets with ``dense_blend`` at 1, so every head forced on is the
  dense blend at 1);
* :func:`experts_forced_off` - an expert never selected: its sub-tokens take their next choice
  (the top-``k`` over the other experts, weighted as the gate weights that selection);
* :func:`routed_top_k` - top-``k`` at evaluation for every layer's heads and / or experts; the gate
  normalisation follows the new ``k`` exactly as the model's formula does with that ``k``
  (:class:`~gohgraph.routers.heads.HeadGate`);
* :func:`messages_ablated` - the graph router without messages (``"no-messages"``: each node only
  attends to itself, the flow keeps the full graph's weights) or with an empty head graph
  (``"empty-graph"``: no messages and no inter-head flow).

A routing decision is the set of heads a token selects in one layer (a head is selected when its
gate is non-zero), and for experts the set of experts a sub-token selects; the changed share counts
the (layer, token) or (layer, sub-token) decisions whose set differs from the baseline's.

:func:`ablate` runs them all on a decoder (:class:`~gohgraph.GoHTransformer`) and batches
``[batch, seq]`` of token ids, in eval mode and without gradients, and returns an
:class:`AblationReport`.
"""

from __future__ import annotations

import csv
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..models.decoder import GoHTransformer
from ..moe.layer import MoEFeedForward
from ..routers.heads import MESSAGE_ABLATIONS, HeadRouter, HeadRouting

# the intervention kinds, as the CSV's "kind" column names them
HEAD_OFF, HEAD_ON, EXPERT_OFF, HEAD_K, EXPERT_K, MESSAGES = (
    "head_off", "head_on", "expert_off", "head_k", "expert_k", "messages")
CSV_COLUMNS = ("kind", "layer", "unit", "delta_loss", "changed_decisions")
# what `gohgraph ablate` writes in its --out folder; `gohgraph report` reads JSON_FILE from a run's
# ABLATION_DIR (or the checkpoint's) to show each unit's Δ loss
ABLATION_DIR, JSON_FILE, CSV_FILE, HEATMAP_FILE = "ablation", "ablation.json", "ablation.csv", "ablation_heatmap.png"


# ---------------------------------------------------------------------- the routed units of a model
def head_routings(model: nn.Module) -> List[Optional[HeadRouting]]:
    """Each layer's :class:`~gohgraph.routers.heads.HeadRouting` (``None`` for a dense-router layer)."""
    return [getattr(block.attn, "head_routing", None) for block in model.blocks]


def expert_layers(model: nn.Module) -> List[Optional[MoEFeedForward]]:
    """Each layer's expert feed-forward (``None`` for a dense FFN)."""
    return [block.ffn if isinstance(block.ffn, MoEFeedForward) else None for block in model.blocks]


def check_ablatable(model: nn.Module) -> None:
    """A one-line ``ValueError`` unless ``model`` is a decoder with routed heads or experts."""
    cfg = model.config
    if not isinstance(model, GoHTransformer):
        raise ValueError(f"ablate needs a decoder (GoHTransformer), not a {type(model).__name__}")
    if cfg.recursion != "none":
        raise ValueError(f"ablate needs a decoder without recursion; this one has recursion={cfg.recursion!r}")
    if not any(head_routings(model)) and not any(expert_layers(model)):
        raise ValueError(f"ablate needs routed heads (router graph, linear or query-norm) or expert FFNs; this model "
                         f"has router={cfg.router!r} and ffn={cfg.ffn!r}, so nothing is routed")


# ---------------------------------------------------------------------- interventions
@contextmanager
def heads_forced(model: nn.Module, layer: int, off: Iterable[int] = (), on: Iterable[int] = ()) -> Iterator[None]:
    """Heads ``off`` forced to gate 0 and heads ``on`` to gate 1 in ``layer``, for every token."""
    routing = head_routings(model)[layer]
    if routing is None:
        raise ValueError(f"layer {layer} routes no heads")
    gate = routing.gate
    masks = []
    for heads in (off, on):
        heads = list(heads)
        for head in heads:
            if not 0 <= head < routing.n_heads:
                raise ValueError(f"head {head} is outside 0..{routing.n_heads - 1}")
        mask = torch.zeros(routing.n_heads, dtype=torch.bool)
        mask[heads] = True
        masks.append(mask if heads else None)
    saved = gate.forced_off, gate.forced_on
    gate.forced_off, gate.forced_on = masks
    try:
        yield
    finally:
        gate.forced_off, gate.forced_on = saved


@contextmanager
def experts_forced_off(model: nn.Module, layer: int, experts: Iterable[int]) -> Iterator[None]:
    """Routed ``experts`` of ``layer`` never selected: their sub-tokens take their next choice."""
    ffn = expert_layers(model)[layer]
    if ffn is None:
        raise ValueError(f"layer {layer} has no expert FFN")
    experts = list(experts)
    if len(experts) > ffn.n_routed - ffn.top_k or any(not 0 <= e < ffn.n_routed for e in experts):
        raise ValueError(f"experts {experts}: at most {ffn.n_routed - ffn.top_k} of 0..{ffn.n_routed - 1} can be "
                         f"forced off with top_k_experts={ffn.top_k}")
    mask = torch.zeros(ffn.n_routed, dtype=torch.bool)
    mask[experts] = True
    saved, ffn.gate.forced_off = ffn.gate.forced_off, mask
    try:
        yield
    finally:
        ffn.gate.forced_off = saved


@contextmanager
def routed_top_k(model: nn.Module, heads: Optional[int] = None, experts: Optional[int] = None) -> Iterator[None]:
    """Every layer selects ``heads`` routed heads and / or ``experts`` experts per token (``None``: as trained)."""
    saved = []
    try:
        if heads is not None:
            for routing in filter(None, head_routings(model)):
                if not 1 <= heads <= routing.gate.n_routed:
                    raise ValueError(f"top-k heads={heads} must be in [1, n_routed_heads={routing.gate.n_routed}]")
                saved.append((routing.gate, routing.gate.top_k))
                routing.gate.top_k = heads
        if experts is not None:
            for ffn in filter(None, expert_layers(model)):
                if not 1 <= experts <= ffn.n_routed:
                    raise ValueError(f"top-k experts={experts} must be in [1, n_routed_experts={ffn.n_routed}]")
                saved += [(ffn, ffn.top_k), (ffn.gate, ffn.gate.top_k)]
                ffn.top_k = ffn.gate.top_k = experts
        yield
    finally:
        for module, k in reversed(saved):
            module.top_k = k


@contextmanager
def messages_ablated(model: nn.Module, kind: str) -> Iterator[None]:
    """Every graph head router runs with ``message_ablation=kind`` (:data:`MESSAGE_ABLATIONS`)."""
    if kind not in MESSAGE_ABLATIONS:
        raise ValueError(f"message ablation {kind!r} must be one of {MESSAGE_ABLATIONS}")
    routers = [r.router for r in filter(None, head_routings(model)) if isinstance(r.router, HeadRouter)]
    if not routers:
        raise ValueError("message ablation needs a graph head router (router='graph')")
    saved = [router.message_ablation for router in routers]
    for router in routers:
        router.message_ablation = kind
    try:
        yield
    finally:
        for router, value in zip(routers, saved):
            router.message_ablation = value


# ---------------------------------------------------------------------- measuring
@dataclass
class Evaluation:
    """Validation loss (nats per predicted token) and the routing decisions behind it.

    ``head_sets``: per layer ``[tokens, heads]`` bool (selected heads) or ``None``;
    ``expert_sets``: per layer ``[tokens * subtokens, experts]`` bool or ``None``.
    """

    loss: float
    head_sets: List[Optional[torch.Tensor]]
    expert_sets: List[Optional[torch.Tensor]]


@torch.no_grad()
def evaluate_routing(model: nn.Module, batches: Sequence[torch.Tensor]) -> Evaluation:
    """The model's next-token loss over ``batches`` (each ``[batch, seq]``) and its decisions."""
    total, count = 0.0, 0
    head_sets: List[List[torch.Tensor]] = [[] for _ in model.blocks]
    expert_sets: List[List[torch.Tensor]] = [[] for _ in model.blocks]
    for batch in batches:
        out = model(batch, labels=batch)
        targets = batch[:, 1:].numel()
        total, count = total + float(out.lm_loss) * targets, count + targets
        for layer, record in enumerate(out.routing):
            head_sets[layer].append((record.head_gates != 0).flatten(0, 1).cpu())
            if record.expert_indices is not None:
                indices = record.expert_indices.flatten(0, 2)  # [tokens * subtokens, k]
                n_experts = expert_layers(model)[layer].n_routed
                chosen = torch.zeros(indices.shape[0], n_experts, dtype=torch.bool, device=indices.device)
                expert_sets[layer].append(chosen.scatter_(1, indices, True).cpu())
    return Evaluation(loss=total / max(count, 1),
                      head_sets=[torch.cat(sets) if sets else None for sets in head_sets],
                      expert_sets=[torch.cat(sets) if sets else None for sets in expert_sets])


def changed_share(baseline: List[Optional[torch.Tensor]], other: List[Optional[torch.Tensor]]) -> Optional[float]:
    """The share of decisions (rows of every layer's selection) whose selected set differs."""
    changed = total = 0
    for base, new in zip(baseline, other):
        if base is not None and new is not None:
            changed += int((base != new).any(dim=-1).sum())
            total += base.shape[0]
    return changed / total if total else None


@dataclass
class AblationRow:
    """One intervention: ``kind`` (``head_off`` ...), ``layer`` (``None``: every layer), ``unit``
    (head or expert id, ``k=...``, or the message ablation), Δ loss and the changed decisions."""

    kind: str
    layer: Optional[int]
    unit: str
    delta_loss: float
    changed_decisions: Optional[float]


@dataclass
class AblationReport:
    """What :func:`ablate` measured; ``rows`` in CSV order (:data:`CSV_COLUMNS`)."""

    baseline_loss: float
    tokens: int
    batches: int
    n_layers: int
    n_heads: int
    n_shared_heads: int
    rows: List[AblationRow] = field(default_factory=list)

    def head_matrix(self, kind: str = HEAD_OFF) -> torch.Tensor:
        """``[layers, heads]`` Δ loss of ``kind`` (``head_off`` / ``head_on``), NaN where not measured."""
        matrix = torch.full((self.n_layers, self.n_heads), float("nan"))
        for row in self.rows:
            if row.kind == kind:
                matrix[row.layer, int(row.unit)] = row.delta_loss
        return matrix

    def to_dict(self) -> Dict[str, object]:
        return {"baseline_loss": self.baseline_loss, "tokens": self.tokens, "batches": self.batches,
                "n_layers": self.n_layers, "n_heads": self.n_heads, "n_shared_heads": self.n_shared_heads,
                "definitions": DEFINITIONS, "interventions": [vars(row) for row in self.rows]}

    def write_csv(self, path: Path) -> Path:
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for row in self.rows:
                writer.writerow(["" if value is None else value for value in
                                 (row.kind, row.layer, row.unit, row.delta_loss, row.changed_decisions)])
        return path


DEFINITIONS = {
    "delta_loss": "validation loss under the intervention minus the baseline's, nats per token",
    "changed_decisions": "share of (layer, token) head sets, or (layer, sub-token) expert sets for expert "
                         "interventions, that differ from the baseline's",
    HEAD_OFF: "the head's gate is 0 and it sends no flow, for every token; other gates unchanged",
    HEAD_ON: "the routed head is selected with gate 1 for every token (dense_blend=1's gate); other gates unchanged",
    EXPERT_OFF: "the expert is never selected; its sub-tokens take their next choice",
    HEAD_K: "every layer selects k routed heads; the gates are normalised for that k",
    EXPERT_K: "every layer selects k experts per sub-token",
    MESSAGES: "no-messages: each router node attends only to itself (flow weights kept); "
              "empty-graph: no messages and no inter-head flow",
}


def ablated_k_values(k: int) -> List[int]:
    """``k - 1``, ``k / 2`` (rounded down) and 1, distinct, below ``k`` and at least 1, largest first."""
    return sorted({value for value in (k - 1, k // 2, 1) if 1 <= value < k}, reverse=True)


@torch.no_grad()
def ablate(model: nn.Module, batches: Sequence[torch.Tensor], progress=None) -> AblationReport:
    """Every intervention of the module docstring on ``batches``; ``progress(done, total)`` if given.

    The model is put in eval mode (and left there), every forward runs without gradients, and the
    interventions are undone on return, also on an error.
    """
    check_ablatable(model)
    if not batches:
        raise ValueError("ablate needs at least one validation batch")
    model.eval()
    cfg = model.config
    routings, ffns = head_routings(model), expert_layers(model)
    plans: List[Tuple[str, Optional[int], str, Callable]] = []  # kind, layer, unit, intervention
    for layer, routing in enumerate(routings):
        if routing is None:
            continue
        for head in range(routing.n_heads):
            plans.append((HEAD_OFF, layer, str(head), partial(heads_forced, model, layer, off=[head])))
        for head in range(routing.gate.n_shared, routing.n_heads):
            plans.append((HEAD_ON, layer, str(head), partial(heads_forced, model, layer, on=[head])))
    for layer, ffn in enumerate(ffns):
        if ffn is not None and ffn.n_routed > ffn.top_k:
            for expert in range(ffn.n_routed):
                plans.append((EXPERT_OFF, layer, str(expert), partial(experts_forced_off, model, layer, [expert])))
    if any(routings):
        for k in ablated_k_values(cfg.active_routed_heads):
            plans.append((HEAD_K, None, f"k={k}", partial(routed_top_k, model, heads=k)))
    if any(ffns):
        for k in ablated_k_values(cfg.top_k_experts):
            plans.append((EXPERT_K, None, f"k={k}", partial(routed_top_k, model, experts=k)))
    if any(r is not None and isinstance(r.router, HeadRouter) for r in routings):
        for kind in MESSAGE_ABLATIONS:
            plans.append((MESSAGES, None, kind, partial(messages_ablated, model, kind)))

    baseline = evaluate_routing(model, batches)
    report = AblationReport(baseline_loss=baseline.loss, tokens=sum(b[:, 1:].numel() for b in batches),
                            batches=len(batches), n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                            n_shared_heads=cfg.n_shared_heads)
    for done, (kind, layer, unit, intervention) in enumerate(plans):
        with intervention():
            result = evaluate_routing(model, batches)
        on_experts = kind in (EXPERT_OFF, EXPERT_K)
        changed = (changed_share(baseline.expert_sets, result.expert_sets) if on_experts
                   else changed_share(baseline.head_sets, result.head_sets))
        report.rows.append(AblationRow(kind, layer, unit, result.loss - baseline.loss, changed))
        if progress is not None:
            progress(done + 1, len(plans))
    return report
