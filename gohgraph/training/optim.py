"""The optimizer for training GoH models.

AdamW with two parameter groups: matrices decay; norms, biases, embeddings and router
biases/embeddings do not (decaying a norm gain or a routing bias toward 0 changes what the layer
computes rather than regularising it). Schedules live in :mod:`gohgraph.training.schedules`.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

# parameters whose names contain one of these never decay, whatever their shape ("talking_": the
# talking-heads mixing matrices start at the identity; decay would pull them toward 0, flattening
# every head's attention, rather than toward their dense start)
NO_DECAY_NAME_PARTS = ("embed", "bias", "norm", "head_embedding", "flow_scale", "att_src", "att_dst", "talking_")


def parameter_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """``[{"params": decayed, "weight_decay": wd}, {"params": rest, "weight_decay": 0}]``.

    A parameter decays when it is a matrix (``dim >= 2``) that is neither an embedding nor part
    of a norm; one-dimensional tensors (biases, norm gains, per-head scales) never decay.
    """
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lowered = name.lower()
        if param.dim() >= 2 and not any(part in lowered for part in NO_DECAY_NAME_PARTS):
            decay.append(param)
            decay_names.append(name)
        else:
            no_decay.append(param)
            no_decay_names.append(name)
    return [{"params": decay, "weight_decay": weight_decay, "param_names": decay_names},
            {"params": no_decay, "weight_decay": 0.0, "param_names": no_decay_names}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas: Tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`; ``foreach`` stays at PyTorch's default for the device."""
    groups = parameter_groups(model, weight_decay)
    names = [group.pop("param_names") for group in groups]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    # parameter names travel with the optimizer so a checkpoint can check it restores the right tensors
    optimizer.param_names = [n for group_names in names for n in group_names]
    return optimizer
