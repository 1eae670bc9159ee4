"""Percentiles of load, per layer and across layers (docs/analysis.md; NeMo / Megatron report them).

Loads are counts: assignments per routed expert (every top-k assignment of every real sub-token)
and activations per routed head; utilisation is an expert's load over the ideal equal load.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

PERCENTILES = (0, 5, 25, 50, 75, 95, 100)


def percentile_summary(values: torch.Tensor) -> Dict[str, float]:
    """``min, p5, p25, p50, p75, p95, max, mean, std`` of ``values`` (linear interpolation)."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    points = torch.tensor(PERCENTILES, dtype=torch.float64) / 100
    quantiles = torch.quantile(values, points)
    out = {("min" if p == 0 else "max" if p == 100 else f"p{p}"): float(q) for p, q in zip(PERCENTILES, quantiles)}
    out.update(mean=float(values.mean()), std=float(values.std(unbiased=False)))
    return out


def load_percentiles(layers: List[Dict[str, Any]], n_shared_heads: int) -> Dict[str, Any]:
    """Percentiles of load per layer and across all layers (NeMo / Megatron's "tokens per expert").

    ``experts``: assignments per routed expert (every top-k assignment counts) and utilisation
    (load / ideal load); ``heads``: activations per routed head. ``per_layer`` holds one summary
    per layer, ``across_layers`` pools every (layer, node) value.
    """
    out: Dict[str, Any] = {}
    expert_layers = [layer for layer in layers if "experts" in layer]
    if expert_layers:
        out["experts"] = {}
        for metric in ("assignment_count", "utilisation"):
            per_layer = [torch.tensor(layer["experts"][metric], dtype=torch.float64) for layer in expert_layers]
            out["experts"][metric] = {
                "per_layer": [{"layer": layer["layer"], **percentile_summary(values)}
                              for layer, values in zip(expert_layers, per_layer)],
                "across_layers": percentile_summary(torch.cat(per_layer)),
            }
    routed = [torch.tensor(layer["heads"]["activation_count"][n_shared_heads:], dtype=torch.float64)
              for layer in layers]
    if routed and all(values.numel() > 0 for values in routed):
        out["heads"] = {"activation_count": {
            "per_layer": [{"layer": layer["layer"], **percentile_summary(values)}
                          for layer, values in zip(layers, routed)],
            "across_layers": percentile_summary(torch.cat(routed)),
        }}
    return out
