r"""Router saturation across a run's checkpoints (OLMoE, Muennighoff et al. 2024, §5.1).

How early does the router settle? For a checkpoint ``c`` and the run's final model ``f``, on the
same fixed validation batches, each routing decision selects a set of routed units: a token's
routed heads in a layer (shared heads are always on and left out), or a sub-token's top-``k``
experts. Saturation of layer ``l`` is the share of the final model's choices that the checkpoint
already makes,

.. math::
    \mathrm{sat}_l(c) = \frac{\sum_d |A^c_{l,d} \cap A^f_{l,d}|}{\sum_d |A^f_{l,d}|},

summed over the decisions ``d`` (tokens for heads, sub-tokens for experts). With a fixed top-``k``
both sets have ``k`` members, so this is also the share of the checkpoint's top-``k`` choices that
equal the final ones; the final model against itself gives exactly 1. Heads are measured in layers
whose heads are routed, experts in expert layers; a kind a layer lacks is ``None``.

Checkpoints are whatever the run kept: ``keep_last`` (``--set keep_last=N`` with ``save_every``)
bounds how many ``checkpoints/step_*`` a run holds. :func:`routing_saturation` takes the models
one at a time, so only two are in memory at once.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .ablation import check_ablatable, evaluate_routing, expert_layers, head_routings


def routed_choices(model: nn.Module, batches: Sequence[torch.Tensor]) -> Tuple[float, List[Optional[torch.Tensor]],
                                                                                  List[Optional[torch.Tensor]]]:
    """``(loss, heads, experts)`` of ``model`` on ``batches`` (eval mode, no grad): per layer the
    routed heads each token selects, ``[tokens, routed heads]`` bool, and the experts each sub-token
    selects, ``[tokens * subtokens, routed experts]`` bool (``None`` where the layer routes none)."""
    check_ablatable(model)
    was_training = model.training
    model.eval()
    try:
        evaluation = evaluate_routing(model, batches)
    finally:
        model.train(was_training)
    heads = [None if routing is None else sets[:, routing.gate.n_shared:]
             for routing, sets in zip(head_routings(model), evaluation.head_sets)]
    experts = [None if ffn is None else sets for ffn, sets in zip(expert_layers(model), evaluation.expert_sets)]
    return evaluation.loss, heads, experts


def saturation_share(choices: Optional[torch.Tensor], final: Optional[torch.Tensor]) -> Optional[float]:
    """``sum |A ∩ F| / sum |F|`` of two ``[decisions, units]`` bool selections (module docstring)."""
    if choices is None or final is None:
        return None
    if choices.shape != final.shape:
        raise ValueError(f"saturation compares the same decisions: got {list(choices.shape)} and {list(final.shape)}")
    chosen = int(final.sum())
    return int((choices & final).sum()) / chosen if chosen else None


def routing_saturation(checkpoints: Iterable[Tuple[int, nn.Module]], final: nn.Module,
                       batches: Sequence[torch.Tensor]) -> Dict[str, Any]:
    """Saturation of each ``(step, model)`` of ``checkpoints`` against ``final`` on ``batches``.

    Returns ``{"tokens", "checkpoints": [{"step", "loss", "layers": [{"layer", "heads", "experts"}],
    "heads", "experts"}]}`` in the order given; ``heads`` / ``experts`` at the checkpoint level are
    the mean over the layers that route them (``None`` if none does). ``loss`` is the checkpoint's
    next-token loss on the same batches (nats per token).
    """
    if not batches:
        raise ValueError("routing saturation needs at least one validation batch")
    _, final_heads, final_experts = routed_choices(final, batches)
    entries = []
    for step, model in checkpoints:
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"checkpoint step {step!r} must be an int")
        if model.config.n_layers != final.config.n_layers:
            raise ValueError(f"checkpoint at step {step} has n_layers={model.config.n_layers}, the final model "
                             f"{final.config.n_layers}: saturation compares checkpoints of one run")
        loss, heads, experts = routed_choices(model, batches)
        layers = [{"layer": layer, "heads": saturation_share(h, fh), "experts": saturation_share(e, fe)}
                  for layer, (h, fh, e, fe) in enumerate(zip(heads, final_heads, experts, final_experts))]
        entries.append({"step": step, "loss": loss, "layers": layers,
                        **{kind: _mean([layer[kind] for layer in layers]) for kind in ("heads", "experts")}})
    return {"tokens": sum(batch.numel() for batch in batches), "checkpoints": entries}


def _mean(values: List[Optional[float]]) -> Optional[float]:
    known = [value for value in values if value is not None]
    return sum(known) / len(known) if known else None
