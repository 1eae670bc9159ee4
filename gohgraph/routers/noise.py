r"""Stochastic routing: noise on router logits in training, none in evaluation.

The MoE lecture's "randomly sample experts based on the probability distribution", in the three
forms the literature uses; :class:`~gohgraph.routers.heads.HeadGate` and
:class:`~gohgraph.routers.experts.ExpertGate` apply one each (``cfg.head_router_noise``,
``cfg.expert_router_noise``). With logits :math:`s` of the ``n`` routed nodes:

* ``"noisy-top-k"`` (Shazeer et al. 2017): :math:`\tilde s = s + \epsilon \cdot
  \mathrm{softplus}(W_{noise} x)`, :math:`\epsilon \sim \mathcal N(0, 1)`; the top-``k`` of
  :math:`\tilde s` are selected and weighted by the softmax of :math:`\tilde s` over them, as in the
  paper. :math:`W_{noise}` starts at 0 (the paper's initialisation; noise std :math:`\ln 2`) and
  learns through those weights.
* ``"gumbel"`` (Gumbel-top-k, Kool et al. 2019): the top-``k`` of :math:`s + g`, :math:`g_i`
  i.i.d. standard Gumbel, is a sample of ``k`` nodes *without replacement* in proportion to
  :math:`\mathrm{softmax}(s)` (the first one with probability :math:`p_i`, the next from the
  renormalised rest, ...). Only the selection is sampled; the weights are the noiseless softmax
  over the sampled nodes.
* ``"jitter"`` (Switch Transformer's multiplicative jitter): :math:`\tilde s = s \odot u`,
  :math:`u_i \sim U(1-\varepsilon, 1+\varepsilon)`, used for selection and weights. Switch
  multiplies the router's *input* by :math:`u`; here the logits are jittered, which reaches every
  router kind (graph routers included) from one place, and is not the same noise as Switch's.

The routing losses always read the noiseless logits. Evaluation (``module.eval()``) returns the
logits unchanged, so an evaluated model routes exactly as the same weights with ``"none"``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ROUTER_NOISES as NOISES


class RouterNoise(nn.Module):
    """Noise of kind ``kind`` (one of :data:`NOISES`) for ``n_nodes`` routed nodes.

    Shapes: ``logits [..., n_nodes]`` (float32), ``inputs [..., d_in]`` (what ``"noisy-top-k"``'s
    noise scale reads; ignored otherwise) -> ``(selection_logits, weight_logits)``, both
    ``[..., n_nodes]``: the top-``k`` is taken of the first, the gate weights computed from the second.
    """

    def __init__(self, kind: str, d_in: int, n_nodes: int, jitter_eps: float = 0.01) -> None:
        super().__init__()
        if kind not in NOISES:
            raise ValueError(f"router noise {kind!r} is not one of {list(NOISES)}")
        self.kind, self.jitter_eps = kind, jitter_eps
        self.noise_weight: Optional[nn.Parameter] = None
        if kind == "noisy-top-k":
            self.noise_weight = nn.Parameter(torch.zeros(n_nodes, d_in))  # Shazeer: W_noise starts at 0

    def forward(self, logits: torch.Tensor, inputs: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.training or self.kind == "none":
            return logits, logits
        if self.kind == "gumbel":
            # -log(E), E ~ Exp(1), is standard Gumbel; no log(0) from a uniform draw of exactly 0
            return logits + torch.empty_like(logits).exponential_().log().neg(), logits
        if self.kind == "jitter":
            jittered = logits * torch.empty_like(logits).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            return jittered, jittered
        if inputs is None:
            raise ValueError("noisy-top-k routing needs the router's inputs for its learned noise scale")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            noise_std = F.softplus(F.linear(inputs.float(), self.noise_weight.float()))
        noisy = logits + torch.randn_like(logits) * noise_std
        return noisy, noisy

    def extra_repr(self) -> str:
        return self.kind + (f", eps={self.jitter_eps}" if self.kind == "jitter" else "")
