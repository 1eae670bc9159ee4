"""Routing drift: how many tokens change their route between two checkpoints of one model.

A token's *route* in a layer is its set of active heads (``head_gates > 0``) and, in MoE layers,
the set of experts each of its sub-tokens was sent to (order within the top-k ignored). Drift is
the share of tokens whose route differs; gate values and weights are ignored on purpose: drift
measures discrete decisions, which is what changes the compute and the balance.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable

import torch


@torch.no_grad()
def routing_drift(model_a: torch.nn.Module, model_b: torch.nn.Module, batches: Iterable[torch.Tensor],
                  progress: bool = False) -> Dict[str, Any]:
    """Share of tokens whose active heads (and experts) differ between ``model_a`` and ``model_b``.

    Both models run in eval mode on the same ``batches`` of ``input_ids [batch, seq]``. Returns
    ``{"tokens", "layers": [{"layer", "head_drift", "expert_drift"?}], "head_drift",
    "expert_drift"?, "token_drift"}``: per-layer shares, their mean over layers, and the share of
    tokens whose route changed in at least one layer. ``expert_drift`` only appears for MoE layers.
    """
    from tqdm.auto import tqdm

    cfg_a, cfg_b = model_a.config, model_b.config
    for name in ("n_layers", "n_heads", "ffn", "n_experts", "n_shared_experts", "n_subtokens"):
        if getattr(cfg_a, name) != getattr(cfg_b, name):
            raise ValueError(f"routing_drift needs models of one shape: {name}={getattr(cfg_a, name)} "
                             f"vs {name}={getattr(cfg_b, name)}")
    n_layers = cfg_a.n_layers
    head_changed = torch.zeros(n_layers, dtype=torch.float64)
    expert_changed = torch.zeros(n_layers, dtype=torch.float64)
    any_changed, tokens, has_experts = 0.0, 0, [False] * n_layers
    modes = (model_a.training, model_b.training)
    model_a.eval(), model_b.eval()
    try:
        for input_ids in tqdm(batches, desc="routing drift", unit="batch", disable=not progress):
            routing_a = model_a(input_ids.to(next(model_a.parameters()).device)).routing
            routing_b = model_b(input_ids.to(next(model_b.parameters()).device)).routing
            changed_any_layer = torch.zeros(input_ids.numel(), dtype=torch.bool)
            for i, (layer_a, layer_b) in enumerate(zip(routing_a, routing_b)):
                heads = _head_sets(layer_a.head_gates) != _head_sets(layer_b.head_gates)
                changed = heads.any(-1)
                head_changed[i] += changed.sum()
                if layer_a.expert_indices is not None and layer_b.expert_indices is not None:
                    has_experts[i] = True
                    experts = (_expert_sets(layer_a.expert_indices) != _expert_sets(layer_b.expert_indices))
                    experts = experts.flatten(1).any(-1)
                    expert_changed[i] += experts.sum()
                    changed = changed | experts
                changed_any_layer |= changed
            any_changed += float(changed_any_layer.sum())
            tokens += input_ids.numel()
    finally:
        model_a.train(modes[0]), model_b.train(modes[1])
    if tokens == 0:
        raise ValueError("routing_drift got no batches")
    layers = []
    for i in range(n_layers):
        layer = {"layer": i, "head_drift": float(head_changed[i] / tokens)}
        if has_experts[i]:
            layer["expert_drift"] = float(expert_changed[i] / tokens)
        layers.append(layer)
    result: Dict[str, Any] = {"tokens": tokens, "layers": layers,
                              "head_drift": float(head_changed.mean() / tokens)}
    if any(has_experts):
        result["expert_drift"] = float(expert_changed[torch.tensor(has_experts)].mean() / tokens)
    result["token_drift"] = any_changed / tokens
    return result


def _head_sets(head_gates: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, heads]`` gates -> ``[tokens, heads]`` bool membership."""
    return (head_gates > 0).reshape(-1, head_gates.shape[-1]).cpu()


def _expert_sets(expert_indices: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, m, k]`` ids -> ``[tokens, m, k]`` sorted ids (a set per sub-token)."""
    return expert_indices.reshape(-1, *expert_indices.shape[2:]).sort(dim=-1).values.cpu()
