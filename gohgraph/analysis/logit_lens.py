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

**Experts** (:class:`ExpertLogitLens`). An expert layer's output is linear in what each routed
expert returns (module docstring of :mod:`gohgraph.moe.layer`): sub-token ``s`` of token ``t``
gets :math:`\sum_{e} w_{t,s,e} E_e(x_{t,s})`, the slots are concatenated and merged, so expert
``e``'s direct contribution to the residual at token ``t`` is

.. math::
    c_{e,t} = W_{merge}\, \big[\ \mathbb 1[e \in \mathrm{top}k(t,s)]\, w_{t,s,e}\, E_e(x_{t,s})\ \big]_{s=1..m}
    \qquad (W_{merge} = I \text{ without a merge layer}),

and its lens is :math:`\ell_e = W_U\, \frac{1}{|T_e|} \sum_{t \in T_e} c_{e,t}` over the real tokens
``T_e`` that sent at least one sub-token to ``e``. The expert outputs are recomputed from the
layer's captured input with the layer's own modules (head layer, grouped experts) for the
choices the routing record names, so nothing in the dispatch is hooked; shared experts (always
on) are not routed units and are left out. Same scope and final-norm rule as the heads. With
BitNet layers (``linear="bitnet"``) the experts run as the model runs them (quantised), while the
merge is applied with its latent full-precision weight, as the heads' ``W_O`` is.

    experts = collect_expert_logit_lens(model, batches, top_k=10, tokenizer=tokenizer)
    experts["1"]["2"]  # layer 1, routed expert 2: [[token id, score, text], ...] best first
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from ..models.output_head import output_weight

__all__ = ["ExpertLogitLens", "LogitLens", "capture_expert_inputs", "capture_head_outputs",
           "collect_expert_logit_lens", "collect_logit_lens", "expert_lens_supported", "lens_supported"]

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
        return unembedding(self.model, self.final_norm_weight)

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
        return {str(layer): top_token_rows(self.scores(layer), self.counts[layer], top_k, tokenizer)
                for layer in range(len(self.model.blocks))}


def unembedding(model: nn.Module, final_norm_weight: bool = False) -> torch.Tensor:
    """``W_U [vocab, d_model]`` (float64, CPU) of a decoder, times the final norm's weight when asked."""
    w_u = output_weight(model).detach().double().cpu()
    weight = getattr(model.final_norm, "weight", None)
    if final_norm_weight and weight is not None:
        w_u = w_u * weight.detach().double().cpu()
    return w_u


def top_token_rows(scores: torch.Tensor, counts: torch.Tensor, top_k: int, tokenizer=None) -> Dict[str, Any]:
    """``{unit: [[token id, score(, text)], ...]}`` best first from ``scores [units, vocab]``; a unit
    whose ``counts`` entry is 0 (never active) gets ``[]``."""
    k = min(top_k, scores.shape[1])
    top = scores.nan_to_num(float("-inf")).topk(k, dim=1)
    units: Dict[str, Any] = {}
    for unit in range(scores.shape[0]):
        rows = []
        if counts[unit] > 0:
            for value, token in zip(top.values[unit].tolist(), top.indices[unit].tolist()):
                rows.append([token, value] + ([_decode(tokenizer, token)] if tokenizer is not None else []))
        units[str(unit)] = rows
    return units


def _decode(tokenizer, token: int) -> str:
    try:
        return tokenizer.decode([token])
    except Exception:  # an id the tokenizer cannot show on its own (a byte of a multi-byte char, ...)
        return ""


def run_logit_lens(model: nn.Module, batches: Iterable[Batch], final_norm_weight: bool = False) -> LogitLens:
    """Run ``model`` (eval mode, no grad) over ``batches`` of ``input_ids`` or ``(input_ids,
    attention_mask)`` and return the filled :class:`LogitLens`; the training mode is restored."""
    return _fill(LogitLens(model, final_norm_weight), model, batches, capture_head_outputs)


def _fill(lens, model: nn.Module, batches: Iterable[Batch], capture):
    """Feed ``lens`` every batch's captured tensors (``capture(model)``, a context manager) and
    routing, in eval mode without gradients; the training mode is restored."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture(model) as captured:
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


# ---------------------------------------------------------------------- experts
def expert_lens_supported(model: nn.Module) -> bool:
    """Whether :class:`ExpertLogitLens` covers ``model``: a decoder applying each block once, with
    at least one expert feed-forward layer."""
    from ..models.decoder import GoHTransformer
    from ..moe.layer import MoEFeedForward

    if not isinstance(model, GoHTransformer) or model.config.recursion != "none":
        return False
    return any(isinstance(block.ffn, MoEFeedForward) for block in model.blocks)


@contextlib.contextmanager
def capture_expert_inputs(model: nn.Module) -> Iterator[List[Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]]]:
    """Within the context, every forward of ``model`` fills the yielded list, one entry per layer,
    with ``(x [batch, seq, d_model], token_mask [batch, seq] or None)`` as they enter each expert
    feed-forward layer (detached; ``None`` for a dense layer). Hooks only, removed on exit."""
    from ..moe.layer import MoEFeedForward

    captured: List[Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]] = [None] * len(model.blocks)
    handles = []

    def hook_for(layer: int):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            mask = args[1] if len(args) > 1 else kwargs.get("token_mask")
            captured[layer] = (x.detach(), None if mask is None else mask.detach())
        return hook

    try:
        for layer, block in enumerate(model.blocks):
            if isinstance(block.ffn, MoEFeedForward):
                handles.append(block.ffn.register_forward_pre_hook(hook_for(layer), with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class ExpertLogitLens:
    r"""Running per-(layer, routed expert) sums of the experts' applied outputs, before the merge.

    ``sums [layers, experts, subtokens, d_sub]`` holds :math:`\sum_t \sum_s w_{t,s,e} E_e(x_{t,s})` in
    slot ``s`` (the merge is linear, so it is applied once in :meth:`scores`), ``counts [layers,
    experts]`` the real tokens that sent a sub-token to the expert. ``update(expert_inputs, routing,
    attention_mask=None)`` adds one batch (``expert_inputs`` from :func:`capture_expert_inputs`).
    """

    def __init__(self, model: nn.Module, final_norm_weight: bool = False) -> None:
        if not expert_lens_supported(model):
            raise ValueError("the expert logit lens covers decoder models with expert feed-forward layers, "
                             "applying each block once (no Mixture-of-Recursions)")
        from ..moe.layer import MoEFeedForward

        self.model, self.final_norm_weight = model, final_norm_weight
        self.ffns = [block.ffn if isinstance(block.ffn, MoEFeedForward) else None for block in model.blocks]
        first = next(ffn for ffn in self.ffns if ffn is not None)
        self.n_experts, self.n_subtokens, self.d_sub = first.n_routed, first.n_subtokens, first.d_sub
        self.sums = torch.zeros(len(self.ffns), self.n_experts, self.n_subtokens, self.d_sub, dtype=torch.float64)
        self.counts = torch.zeros(len(self.ffns), self.n_experts, dtype=torch.float64)

    @torch.no_grad()
    def update(self, expert_inputs, routing, attention_mask=None) -> None:
        for layer, (ffn, captured, record) in enumerate(zip(self.ffns, expert_inputs, routing)):
            if ffn is None:
                continue
            if captured is None or record.expert_indices is None:
                raise ValueError(f"layer {layer}: the expert layer's input or routing was not captured")
            x, token_mask = captured
            real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            if token_mask is not None:
                real &= token_mask.bool()
            if attention_mask is not None:
                real &= attention_mask.to(x.device).bool()[:, -x.shape[1]:]
            sums, counts = applied_expert_outputs(ffn, x, record.expert_indices, record.expert_weights, real)
            self.sums[layer] += sums.cpu()
            self.counts[layer] += counts.cpu()
        expert_inputs[:] = [None] * len(expert_inputs)

    @torch.no_grad()
    def scores(self, layer: int) -> torch.Tensor:
        """``[experts, vocab]``: each routed expert's mean direct logit contribution (NaN: never chosen)."""
        ffn = self.ffns[layer]
        if ffn is None:
            raise ValueError(f"layer {layer} has no expert feed-forward")
        mean = (self.sums[layer] / self.counts[layer][:, None, None]).flatten(1)  # [experts, d_model], slots concatenated
        if ffn.has_head_and_merge:
            mean = mean @ ffn.merge.weight.detach().double().cpu().t()  # c_e = W_merge [...]
        return mean @ unembedding(self.model, self.final_norm_weight).t()

    def report(self, top_k: int = 10, tokenizer=None) -> Dict[str, Dict[str, Any]]:
        """``{layer: {expert: [[token id, score(, text)], ...]}}`` for the expert layers (string keys,
        routed expert ids, best first); an expert never chosen over the data gets ``[]``."""
        return {str(layer): top_token_rows(self.scores(layer), self.counts[layer], top_k, tokenizer)
                for layer, ffn in enumerate(self.ffns) if ffn is not None}


def applied_expert_outputs(ffn: nn.Module, x: torch.Tensor, expert_indices: torch.Tensor,
                           expert_weights: torch.Tensor, real: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Per routed expert, the sum of its gate-weighted outputs over the real tokens, per sub-token slot.

    ``x [batch, seq, d_model]`` (the layer's input), ``expert_indices`` / ``expert_weights``
    ``[batch, seq, m, k]``, ``real [batch, seq]`` bool -> (``[experts, m, d_sub]`` float64 sums of
    :math:`w_{t,s,e} E_e(x_{t,s})`, ``[experts]`` float64 count of real tokens that chose the expert
    in some slot). The experts run once on their chosen sub-tokens, sorted by expert as the layer's
    dispatch does, through the layer's own expert module.
    """
    n_experts, m = ffn.n_routed, ffn.n_subtokens
    k = expert_indices.shape[-1]
    sub = (ffn.head(x) if ffn.has_head_and_merge else x).reshape(-1, m, ffn.d_sub)  # [tokens, m, d_sub]
    indices = expert_indices.reshape(-1, m, k).long()
    weights = expert_weights.reshape(-1, m, k)
    token, slot, choice = torch.nonzero(real.reshape(-1)[:, None, None].expand(-1, m, k), as_tuple=True)
    experts = indices[token, slot, choice]
    order = torch.argsort(experts, stable=True)
    token, slot, choice, experts = token[order], slot[order], choice[order], experts[order]
    offsets = torch.bincount(experts, minlength=n_experts).cumsum(0).to(torch.int32)
    outputs = ffn.experts(sub[token, slot], offsets).double() * weights[token, slot, choice].double()[:, None]
    sums = torch.zeros(n_experts * m, ffn.d_sub, dtype=torch.float64, device=x.device)
    sums.index_add_(0, experts * m + slot, outputs)
    chose = torch.zeros(sub.shape[0], n_experts, dtype=torch.bool, device=x.device)
    chose[token, experts] = True  # a token that sent two slots to e counts once
    return sums.view(n_experts, m, ffn.d_sub), chose.sum(0).double()


def run_expert_logit_lens(model: nn.Module, batches: Iterable[Batch], final_norm_weight: bool = False
                          ) -> ExpertLogitLens:
    """Run ``model`` (eval mode, no grad) over ``batches`` (as :func:`run_logit_lens`) and return the
    filled :class:`ExpertLogitLens`; the training mode is restored."""
    return _fill(ExpertLogitLens(model, final_norm_weight), model, batches, capture_expert_inputs)


def collect_expert_logit_lens(model: nn.Module, batches: Iterable[Batch], top_k: int = 10, tokenizer=None,
                              final_norm_weight: bool = False) -> Dict[str, Dict[str, Any]]:
    """:meth:`ExpertLogitLens.report` of ``model`` over ``batches`` (see the module docstring)."""
    return run_expert_logit_lens(model, batches, final_norm_weight).report(top_k, tokenizer)
