r"""SwitchHead's value and output projections (Csordás, Piękos, Irie, Schmidhuber, NeurIPS 2024).

With ``cfg.n_attention_experts = E >= 2`` the attention keeps its single per-head query and key
projections and takes its values and output from this module: per head, ``E``
value experts and ``E`` output experts, ``k = cfg.top_k_attention_experts`` of each chosen per token
by a non-competitive sigmoid (no softmax, no renormalisation, no balance loss), as the released
``SwitchHeadCore`` (RobertCsordas/switchhead) does:

.. math::
    s^V_t = \sigma(x_t W_S^{V})_{h}, \quad
    V_h(x_t) = \sum_{e \in \mathrm{topk}(s^V_{t,h})} s^V_{t,h,e}\, x_t W_V^{h,e}, \qquad
    y_t = \sum_h \sum_{e \in \mathrm{topk}(s^O_{t,h})} s^O_{t,h,e}\, o_{t,h} W_O^{h,e}

The value selection is read from the token the value belongs to (the key/value source: its value
is fixed once computed, so the cache holds mixed values ``[batch, kv_heads, len, head_dim]``), the
output selection from the token being written (the query side). Only the chosen experts run: the
``(token, head, expert)`` assignments are sorted by expert and run through
:func:`~gohgraph.ops.grouped_matmul.routed_matmul` (one grouped matmul; on CPU expert by expert). Value experts follow the key/value heads
(GQA: a kv head's experts serve its query group), output experts the query heads.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GoHConfig
from ..ops.grouped_matmul import routed_matmul
from ..routing import ExpertRouting


class SwitchHeadProjections(nn.Module):
    """Per-head value and output experts with sigmoid top-k selection.

    Parameters (``H`` query heads, ``H_kv`` kv heads, ``E`` experts, ``d_h`` head width):
    ``value_experts [H_kv, E, d_model, d_h]``, ``value_selection [H_kv * E, d_model]``,
    ``output_experts [H, E, d_h, d_model]``, ``output_selection [H * E, d_model]``. Experts and
    selections start as the attention's projections do (``init_std``; ``output_init_std`` for the
    output experts); the released code's row renormalisation of the selections is not ported.
    """

    def __init__(self, cfg: GoHConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.n_attention_experts, cfg.top_k_attention_experts
        heads, kv_heads, head_dim, d_model = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.d_model
        self.value_experts = nn.Parameter(torch.empty(kv_heads, self.n_experts, d_model, head_dim))
        self.value_selection = nn.Parameter(torch.empty(kv_heads * self.n_experts, d_model))
        self.output_experts = nn.Parameter(torch.empty(heads, self.n_experts, head_dim, d_model))
        self.output_selection = nn.Parameter(torch.empty(heads * self.n_experts, d_model))
        for param in (self.value_experts, self.value_selection, self.output_selection):
            nn.init.normal_(param, std=cfg.init_std)
        nn.init.normal_(self.output_experts, std=cfg.output_init_std)

    def values(self, source: torch.Tensor) -> Tuple[torch.Tensor, ExpertRouting]:
        """``source [batch, len, d_model]`` -> values ``[batch, len, kv_heads * head_dim]`` and the choices."""
        batch, length, d_model = source.shape
        kv_heads, head_dim = self.value_experts.shape[0], self.value_experts.shape[-1]
        expert_ids, gates, record = self._select(source, self.value_selection, kv_heads)
        assignment = torch.arange(expert_ids.numel(), device=source.device)
        values = routed_matmul(source.reshape(batch * length, d_model), self.value_experts.flatten(0, 1),
                               expert_ids, gates, row_index=assignment // (kv_heads * self.top_k),
                               out_index=assignment // self.top_k, n_out=batch * length * kv_heads)
        return values.view(batch, length, kv_heads * head_dim), record

    def output(self, attn: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, ExpertRouting]:
        """Heads' outputs ``attn [batch, seq, heads, head_dim]``, chosen by ``x [batch, seq, d_model]``
        -> ``y [batch, seq, d_model]`` and the choices."""
        batch, seq, heads, head_dim = attn.shape
        expert_ids, gates, record = self._select(x, self.output_selection, heads)
        assignment = torch.arange(expert_ids.numel(), device=x.device)
        y = routed_matmul(attn.reshape(batch * seq * heads, head_dim), self.output_experts.flatten(0, 1),
                          expert_ids, gates, row_index=assignment // self.top_k,
                          out_index=assignment // (heads * self.top_k), n_out=batch * seq)
        return y.view(batch, seq, -1), record

    def _select(self, tokens: torch.Tensor, selection: torch.Tensor, heads: int
                ) -> Tuple[torch.Tensor, torch.Tensor, ExpertRouting]:
        """Sigmoid top-k per head: flat expert ids (``head * E + e``) and gates ``[batch * len * heads * k]``."""
        # scores in float32, as the released get_sel
        scores = torch.sigmoid(F.linear(tokens, selection).float()).view(*tokens.shape[:-1], heads, self.n_experts)
        chosen = scores.topk(self.top_k, dim=-1).indices  # [batch, len, heads, k]
        gates = scores.gather(-1, chosen)
        offsets = torch.arange(heads, device=tokens.device).unsqueeze(-1) * self.n_experts
        record = ExpertRouting(expert_indices=chosen.detach(), expert_weights=gates.detach())
        return (chosen + offsets).reshape(-1), gates.reshape(-1), record

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, top_k={self.top_k}"
