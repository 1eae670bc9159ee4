r"""Logit lens per head: the tokens each attention head's output promotes through the unembedding.

Direct logit attribution (Elhage et al. 2021; TransformerLens' ``decompose_resid``): the attention
output of a layer is :math:`W_O\,[\tilde o_1; \dots; \tilde o_H] + b_O`, a sum of one term per head,

.. math::
    c_{h,t} = W_O[:, h d:(h+1) d]\; \tilde o_{h,t},

where :math:`\tilde o_{h,t}` is head ``h``'s output at token ``t`` *as the model applies it*: gated
(``g_h o_h``) or mixed by the inter-head flow (``(M o)_h``), i.e. exactly what enters the output
projection ``attn.out`` (captured by a forward pre-hook on it; no weight is changed). Head ``h``'s
lens is the mean of its contribution over the real (non-padding) tokens where it is active
(``head_gates != 0``; every token for a dense router), projected through the unembedding
:math:`W_U` (the tied embedding or ``lm_head``):

.. math::
    \ell_h = W_U\, W_O[:, h]\; \frac{1}{|T_h|} \sum_{t \in T_h} \tilde o_{h,t} \quad [\text{vocab}].

**The final norm is not applied** (the default, ``final_norm_weight=False``): the lens is the
direct path :math:`W_U W_O[h] \tilde o_h`. A norm's centering and its per-token ``1/RMS`` depend on
the whole residual stream, not on the head, and freezing them would make the lens depend on the
other heads of the batch; with ``final_norm_weight=True`` the norm's elementwise weight
:math:`\gamma` is applied (:math:`W_U\,\mathrm{diag}(\gamma)\,W_O[h]\,\tilde o_h`), which rescales
the residual directions as the model does and is still linear. The output bias :math:`b_O` belongs
to no head and is left out. Because the lens is linear, the mean is taken before the projection:
accumulating costs ``heads * head_dim`` numbers per layer, whatever the vocabulary.

Scope: decoder models whose attention has an output projection (not SwitchHead, whose output
projection is per-expert) and that apply each block once (not Mixture-of-Recursions). Under
head-sparse execution a call of at most 4 tokens (a decode step) bypasses ``attn.out``; the lens
refuses such batches rather than miss heads.

    lens = collect_logit_lens(model, batches, top_k=10, tokenizer=tokenizer)
    lens["0"]["3"]  # layer 0, head 3: [[token id, score, text], ...] best first
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["LogitLens", "capture_head_outputs", "collect_logit_lens", "lens_supported"]

Batch = Union[torch.Tensor, Tuple[torch.Tensor, Optional[torch.Tensor]]]


def lens_supported(model: nn.Module) -> bool:
    """Whether :class:`LogitLens` covers ``model`` (see the module docstring's scope)."""
    from ..models.decoder import GoHTransformer

    if not isinstance(model, GoHTransformer) or model.config.recursion != "none":
        return False
    return all(getattr(block.attn, "out", None) is not None for block in model.blocks)


@contextlib.contextmanager
def capture_head_outputs(model: nn.Module) -> Iterator[List[Optional[torch.Tensor]]]:
    """Within the context, every forward of ``model`` fills the yielded list, one entry per layer,
    with the heads' outputs as they enter the output projection, ``[batch, seq, heads, head_dim]``
    (gated or mixed as the model applies them; detached). Hooks only, removed on exit."""
    captured: List[Optional[torch.Tensor]] = [None] * len(model.blocks)
    handles = []

    def hook_for(layer: int, attn: nn.Module):
        def hook(_module, inputs):
            (mixed,) = inputs[:1]
            captured[layer] = mixed.detach().reshape(*mixed.shape[:-1], attn.n_heads, attn.head_dim)
        return hook

    try:
        for layer, block in enumerate(model.blocks):
            handles.append(block.attn.out.register_forward_pre_hook(hook_for(layer, block.attn)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class LogitLens:
    """Running per-(layer, head) sums of the heads' applied outputs over active real tokens.

    ``update(head_outputs, routing, attention_mask=None)`` adds one batch (``head_outputs`` from
    :func:`capture_head_outputs`, ``routing`` the model's ``out.routing``); :meth:`scores` gives the
    lens ``[heads, vocab]`` of a layer and :meth:`report` the top tokens of every head.
    """

    def __init__(self, model: nn.Module, final_norm_weight: bool = False) -> None:
        if not lens_supported(model):
            raise ValueError("the logit lens covers decoder models with an attention output projection, "
                             "applying each block once (no SwitchHead, no Mixture-of-Recursions)")
        self.model = model
        self.final_norm_weight = final_norm_weight
        attn = model.blocks[0].attn
        self.n_heads, self.head_dim = attn.n_heads, attn.head_dim
        shape = (len(model.blocks), self.n_heads, self.head_dim)
        self.sums = torch.zeros(shape, dtype=torch.float64)
        self.counts = torch.zeros(shape[:2], dtype=torch.float64)

    @torch.no_grad()
    def update(self, head_outputs: List[Optional[torch.Tensor]], routing, attention_mask=None) -> None:
        if any(output is None for output in head_outputs):
            raise ValueError("a layer's heads were not captured (a head-sparse call of at most 4 tokens "
                             "skips the output projection): use longer sequences")
        for layer, (output, record) in enumerate(zip(head_outputs, routing)):
            active = record.head_gates != 0  # [batch, seq, heads]
            if attention_mask is not None:
                active = active & attention_mask.to(active.device).bool()[:, -active.shape[1]:, None]
            weights = active.to(torch.float64)
            self.sums[layer] += torch.einsum("bsh,bshd->hd", weights, output.to(torch.float64)).cpu()
            self.counts[layer] += weights.sum(dim=(0, 1)).cpu()
        head_outputs[:] = [None] * len(head_outputs)

    def unembedding(self) -> torch.Tensor:
        """``W_U [vocab, d_model]`` (float64), times the final norm's weight when asked."""
        model = self.model
        w_u = (model.embed.weight if model.lm_head is None else model.lm_head.weight).detach().double().cpu()
        weight = getattr(model.final_norm, "weight", None)
        if self.final_norm_weight and weight is not None:
            w_u = w_u * weight.detach().double().cpu()
        return w_u

    @torch.no_grad()
    def scores(self, layer: int) -> torch.Tensor:
        """``[heads, vocab]``: each head's mean direct logit contribution (NaN for a never-active head)."""
        w_o = self.model.blocks[layer].attn.out.weight.detach().double().cpu()  # [d_model, heads * head_dim]
        w_o = w_o.view(w_o.shape[0], self.n_heads, self.head_dim)
        mean = self.sums[layer] / self.counts[layer][:, None]  # NaN where never active
        contribution = torch.einsum("mhd,hd->hm", w_o, mean)  # c_h [heads, d_model]
        return contribution @ self.unembedding().t()

    def report(self, top_k: int = 10, tokenizer=None) -> Dict[str, Dict[str, Any]]:
        """``{layer: {head: [[token id, score], ...]}}`` (string keys, best first; ``[token id, score,
        text]`` with a ``tokenizer``); a head never active over the data gets ``[]``."""
        result: Dict[str, Dict[str, Any]] = {}
        for layer in range(len(self.model.blocks)):
            scores = self.scores(layer)
            k = min(top_k, scores.shape[1])
            top = scores.nan_to_num(float("-inf")).topk(k, dim=1)
            heads: Dict[str, Any] = {}
            for head in range(self.n_heads):
                if self.counts[layer, head] == 0:
                    heads[str(head)] = []
                    continue
                rows = []
                for value, token in zip(top.values[head].tolist(), top.indices[head].tolist()):
                    row = [token, value]
                    if tokenizer is not None:
                        row.append(_decode(tokenizer, token))
                    rows.append(row)
                heads[str(head)] = rows
            result[str(layer)] = heads
        return result


def _decode(tokenizer, token: int) -> str:
    try:
        return tokenizer.decode([token])
    except Exception:  # an id the tokenizer cannot show on its own (a byte of a multi-byte char, ...)
        return ""


def run_logit_lens(model: nn.Module, batches: Iterable[Batch], final_norm_weight: bool = False) -> LogitLens:
    """Run ``model`` (eval mode, no grad) over ``batches`` of ``input_ids`` or ``(input_ids,
    attention_mask)`` and return the filled :class:`LogitLens`; the training mode is restored."""
    lens = LogitLens(model, final_norm_weight)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture_head_outputs(model) as captured:
            for batch in batches:
                input_ids, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
                out = model(input_ids.to(device), attention_mask=None if mask is None else mask.to(device))
                lens.update(captured, out.routing, mask)
    finally:
        model.train(was_training)
    return lens


def collect_logit_lens(model: nn.Module, batches: Iterable[Batch], top_k: int = 10, tokenizer=None,
                       final_norm_weight: bool = False) -> Dict[str, Dict[str, Any]]:
    """:meth:`LogitLens.report` of ``model`` over ``batches`` (see the module docstring)."""
    return run_logit_lens(model, batches, final_norm_weight).report(top_k, tokenizer)
