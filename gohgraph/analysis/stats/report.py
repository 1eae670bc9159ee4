"""Turning routing statistics into reports: the cross-layer summary and the long CSV rows.

Both read the per-layer report dicts :class:`~gohgraph.analysis.stats.collect.RoutingStats` builds and return
plain Python values.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, List

import torch


def summarise_layers(layers: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Cross-layer view: mean balance metrics and the spread of expert utilisation over all layers."""
    summary: Dict[str, Any] = {
        "dead_heads": sum(len(layer["heads"]["dead"]) for layer in layers),
        "active_heads_per_token": _mean(layer["heads"]["active_per_token"] for layer in layers),
    }
    if all("load_cv" in layer["heads"] for layer in layers):
        summary["head_load_cv"] = _mean(layer["heads"]["load_cv"] for layer in layers)
        summary["head_load_entropy"] = _mean(layer["heads"]["load_entropy"] for layer in layers)
    expert_layers = [layer["experts"] for layer in layers if "experts" in layer]
    if expert_layers:
        utilisation = torch.tensor([u for experts in expert_layers for u in experts["utilisation"]],
                                   dtype=torch.float64)
        quantiles = torch.quantile(utilisation, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        summary.update({
            "dead_experts": sum(len(experts["dead"]) for experts in expert_layers),
            "expert_load_cv": _mean(experts["load_cv"] for experts in expert_layers),
            "expert_load_entropy": _mean(experts["load_entropy"] for experts in expert_layers),
            "expert_utilisation": {"min": float(utilisation.min()), "p10": float(quantiles[0]),
                                   "p50": float(quantiles[1]), "p90": float(quantiles[2]),
                                   "max": float(utilisation.max()),
                                   "std": float(utilisation.std(unbiased=False))},
        })
        if all("drop_rate" in experts for experts in expert_layers):
            summary["drop_rate"] = _mean(experts["drop_rate"] for experts in expert_layers)
    return summary


def csv_rows(report: Dict[str, Any]) -> Iterator[tuple]:
    """``(layer, group, item, metric, value)`` rows of every section of a report (see ``to_csv``)."""
    yield from _layer_rows(report)
    yield from _cross_layer_rows(report.get("cross_layer", []))
    yield from _percentile_rows(report["summary"].get("load_percentiles", {}))
    if "by_source" in report:
        yield from _by_source_rows(report["by_source"])
    if "vocabulary" in report:
        yield from _vocabulary_rows(report["vocabulary"])


def _layer_rows(report: Dict[str, Any]) -> Iterator[tuple]:
    edges = report["head_edges"]
    for layer in report["layers"]:
        i, heads = layer["layer"], layer["heads"]
        yield i, "layer", "", "tokens", layer["tokens"]
        for name, value in heads.items():
            if isinstance(value, (int, float)):
                yield i, "layer", "", f"head_{name}", value
        for name in ("activation_count", "activation_frequency", "gate_mass", "mean_gate"):
            for head, value in enumerate(heads[name]):
                yield i, "head", head, name, value
        for offset, value in enumerate(heads.get("routed_load", [])):
            yield i, "head", offset + report["config"]["n_shared_heads"], "routed_load", value
        yield from _pair_rows(i, "head_pair", heads)
        for name, values in layer.get("flow", {}).items():
            for (src, dst), value in zip(edges, values):
                yield i, "edge", f"{src}->{dst}", name, value
        yield from _top_token_rows(i, "head_token", heads.get("top_tokens", []))
        entropy = layer.get("token_entropy", {})
        for name in ("occurrences", "head_entropy", "expert_entropy"):
            for token_id, value in zip(entropy.get("token_id", []), entropy.get(name, [])):
                yield i, "token", token_id, name, value
        experts = layer.get("experts")
        if experts is None:
            continue
        for name, value in experts.items():
            if isinstance(value, (int, float)):
                yield i, "layer", "", f"expert_{name}", value
            elif name not in ("dead", "subtoken_load", "top_tokens", "coactivation", "coactivation_given"):
                for expert, item in enumerate(value):
                    yield i, "expert", expert, name, item
        yield from _pair_rows(i, "expert_pair", experts)
        for sub, row in enumerate(experts["subtoken_load"]):
            for expert, value in enumerate(row):
                yield i, "subtoken_expert", f"{sub}->{expert}", "load", value
        yield from _top_token_rows(i, "expert_token", experts.get("top_tokens", []))


def _pair_rows(layer: int, group: str, section: Dict[str, Any]) -> Iterator[tuple]:
    """Item ``"a&b"``: ``coactivation`` P(a and b) and ``coactivation_given`` P(b | a) (empty: undefined)."""
    for name in ("coactivation", "coactivation_given"):
        for a, row in enumerate(section.get(name, [])):
            for b, value in enumerate(row):
                yield layer, group, f"{a}&{b}", name, "" if value is None else value


def _cross_layer_rows(pairs: List[Dict[str, Any]]) -> Iterator[tuple]:
    """``layer`` is the first layer of the pair; items ``"i->j"`` name a node of it and one of the next."""
    for pair in pairs:
        layer = pair["layers"][0]
        for kind in ("heads", "experts"):
            section = pair.get(kind)
            if section is None:
                continue
            for name, value in section.items():
                if isinstance(value, list):
                    for i, row in enumerate(value):
                        for j, cell in enumerate(row):
                            yield layer, f"cross_layer_{kind}", f"{i}->{j}", name, cell
                else:
                    yield layer, f"cross_layer_{kind}", "", name, value


def _percentile_rows(percentiles: Dict[str, Any]) -> Iterator[tuple]:
    """Per layer and (``layer`` = ``all``) across layers; item = ``experts.assignment_count`` etc."""
    for kind, metrics in percentiles.items():
        for metric, parts in metrics.items():
            for entry in parts["per_layer"]:
                for stat, value in entry.items():
                    if stat != "layer":
                        yield entry["layer"], "load_percentile", f"{kind}.{metric}", stat, value
            for stat, value in parts["across_layers"].items():
                yield "all", "load_percentile", f"{kind}.{metric}", stat, value


def _by_source_rows(by_source: Dict[str, Any]) -> Iterator[tuple]:
    """Groups ``source_head`` / ``source_expert``; item ``"source:node"``."""
    for source, tokens in by_source["tokens"].items():
        yield "", "source", source, "tokens", tokens
    for layer in by_source["layers"]:
        for kind, group in (("heads", "source_head"), ("experts", "source_expert")):
            for metric, per_source in layer.get(kind, {}).items():
                for source, values in per_source.items():
                    for node, value in enumerate(values):
                        yield layer["layer"], group, f"{source}:{node}", metric, value


def _vocabulary_rows(vocabulary: Dict[str, Any]) -> Iterator[tuple]:
    """Groups ``vocab_<heads|experts>_<input|predicted>`` (item = token id: ``occurrences``,
    ``top_unit``, ``top_share``) and ``..._unit`` (item ``"unit#rank"``: ``token_id``,
    ``specialisation``, ``occurrences``)."""
    for layer in vocabulary["layers"]:
        for kind in ("heads", "experts"):
            for key, section in layer.get(kind, {}).items():
                group = f"vocab_{kind}_{key}"
                by_token = section["by_token"]
                for index, token_id in enumerate(by_token["token_id"]):
                    for metric in ("occurrences", "top_unit", "top_share"):
                        yield layer["layer"], group, token_id, metric, by_token[metric][index]
                for unit, rows in zip(section["units"], section["top_tokens"]):
                    for rank, (token_id, share, occurrences) in enumerate(rows):
                        item = f"{unit}#{rank}"
                        yield layer["layer"], f"{group}_unit", item, "token_id", token_id
                        yield layer["layer"], f"{group}_unit", item, "specialisation", share
                        yield layer["layer"], f"{group}_unit", item, "occurrences", occurrences


def _top_token_rows(layer: int, group: str, top_tokens: List[list]) -> Iterator[tuple]:
    """``item`` is ``"node#rank"``; one row for the token id, one for its share of the node."""
    for node, tokens in enumerate(top_tokens):
        for rank, (token_id, share) in enumerate(tokens):
            yield layer, group, f"{node}#{rank}", "token_id", token_id
            yield layer, group, f"{node}#{rank}", "share", share


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(sum(values) / len(values))
