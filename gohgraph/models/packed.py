"""Ternary weights on disk: 2 bits per weight plus one float32 scale per matrix (or per expert).

A BitNet model (``cfg.linear="bitnet"``) computes with :math:`W_q = q\\,\\gamma`, ``q`` in ``{-1, 0, 1}``.
``save_pretrained(..., packed_ternary=True)`` writes, for every ternary weight ``NAME`` (see
:class:`~gohgraph.layers.bitlinear.TernaryWeights`), ``NAME.ternary`` (``uint8 [ceil(n / 4)]``,
:func:`~gohgraph.ops.ternary.pack_ternary`) and ``NAME.ternary_scale`` (float32 ``[]``, or ``[E]``
for stacked experts) instead of the latent float weight: about 16x fewer bytes than float32 for
those matrices. Everything else (embeddings, norms, routers, the output head) is saved as it is.

Loading (:func:`unpack_ternary_state`) sets each such weight to ``q * gamma`` and pins ``gamma``,
so the loaded model computes exactly the saved model's logits. The latent weights are not in the
file: a packed checkpoint is for inference (or for continuing from the ternary point).
"""

from __future__ import annotations

from typing import Dict, Iterator, Tuple

import torch
from torch import nn

from ..layers.bitlinear import TernaryWeights
from ..ops.ternary import pack_ternary, unpack_ternary
from ..storage import CheckpointError

PACKED_SUFFIX = ".ternary"
SCALE_SUFFIX = ".ternary_scale"


def ternary_weights(model: nn.Module) -> Iterator[Tuple[str, TernaryWeights, str]]:
    """``(state_dict key, module, weight name)`` of every ternary weight of ``model``."""
    for prefix, module in model.named_modules():
        if isinstance(module, TernaryWeights):
            for name in module.ternary_dims:
                yield (f"{prefix}.{name}" if prefix else name), module, name


def packed_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` with every ternary weight replaced by its packed codes and scale."""
    weights = list(ternary_weights(model))
    if not weights:
        raise ValueError("packed_ternary=True needs ternary weights: build the model with linear='bitnet' "
                         f"(linear={getattr(getattr(model, 'config', None), 'linear', None)!r})")
    state = dict(model.state_dict())
    with torch.no_grad():
        for key, module, name in weights:
            q, gamma = module.ternary(name)
            del state[key]
            state[key + PACKED_SUFFIX] = pack_ternary(q)
            state[key + SCALE_SUFFIX] = gamma.float()
    return state


def unpack_ternary_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The ``state_dict`` a packed file stands for; pins the scales of ``model``'s ternary weights.

    A file without packed entries is returned unchanged, so this is safe on every checkpoint.
    """
    if not any(key.endswith(PACKED_SUFFIX) for key in state):
        return state
    state = dict(state)
    for key, module, name in ternary_weights(model):
        if key + PACKED_SUFFIX not in state:
            continue  # left for the strict load to report as missing
        shape = getattr(module, name).shape
        gamma = state.pop(key + SCALE_SUFFIX, None)
        if gamma is None:
            raise CheckpointError(f"{key + PACKED_SUFFIX} comes without its scale {key + SCALE_SUFFIX}")
        try:
            q = unpack_ternary(state.pop(key + PACKED_SUFFIX).cpu(), shape)
        except ValueError as err:
            raise CheckpointError(f"{key + PACKED_SUFFIX}: {err}") from None
        gamma = gamma.float().cpu()
        module.load_ternary(name, q, gamma)
        state[key] = getattr(module, name).detach().clone()
    return state
