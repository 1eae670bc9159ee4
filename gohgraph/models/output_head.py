r"""The output head every family shares: the tied embedding, or the model's own matrix.

.. math::
    \mathrm{logits} = h\, W^\top (+\, b), \qquad
    W = \begin{cases} W_E & \texttt{tie\_embeddings} \text{ (Press \& Wolf, 2017)} \\
                      W_{\mathrm{lm}} & \text{otherwise} \end{cases}

with ``h [..., d_model]``, ``W [vocab, d_model]`` and the logits ``[..., vocab]``. The untied
matrix stays the model's attribute ``lm_head`` (``None`` when tied), so every checkpoint keeps its
keys (``embed.weight``, and ``lm_head.weight`` when untied).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GoHConfig


def build_lm_head(cfg: GoHConfig) -> Optional[nn.Linear]:
    """``nn.Linear(d_model, vocab_size, bias=False)`` with weights drawn from ``N(0, init_std^2)``
    for ``cfg.tie_embeddings=False``; ``None`` when the embedding is the output matrix."""
    if cfg.tie_embeddings:
        return None
    lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
    nn.init.normal_(lm_head.weight, std=cfg.init_std)
    return lm_head


def output_weight(model: nn.Module) -> torch.Tensor:
    """``W [vocab, d_model]`` of a model with ``embed`` and ``lm_head`` (``None`` when tied)."""
    return model.embed.weight if model.lm_head is None else model.lm_head.weight


def output_logits(model: nn.Module, hidden: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``hidden [..., d_model]`` -> ``[..., vocab]`` through :func:`output_weight` (and ``bias [vocab]``)."""
    return F.linear(hidden, output_weight(model), bias)
