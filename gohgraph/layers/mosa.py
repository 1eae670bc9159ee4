r"""MoSA's sparse heads (Piękos, Csordás, Schmidhuber 2025, arXiv 2505.00315; piotrpiekos/MoSA).

With ``cfg.n_mosa_heads = H_s > 0`` the attention has, beside its ``n_heads`` dense heads,
``H_s`` sparse heads of width ``d_h = head_dim``, each with its own router, projections and
output, as the released ``PureMoSA``. In training (expert choice over the sequence):

.. math::
    r_{t,h} = \sigma(w_h \cdot x_t), \quad
    I_h = \mathrm{topk}_t(r_{\cdot,h},\, k), \quad k = \min(T, \max(2, \lfloor T/\rho \rfloor)),

    Q_h, K_h, V_h = x_{I_h} W^h_{QKV}, \quad
    o_h = \mathrm{softmax}\Big(\frac{Q_h K_h^\top}{\sqrt{d_h}} + M_h\Big) V_h, \quad
    M_h[i, j] = 0 \text{ if } I_{h,i} \ge I_{h,j} \text{ else } -\infty,

    y_t = \sum_h [t \in I_h]\; r_{t,h}\, o_{h,t} W^h_O

(``ρ = cfg.mosa_sparsity``; RoPE rotates ``Q_h, K_h`` at the kept tokens' original positions;
``cfg.mosa_include_first`` always keeps the first token, as the released ``include_first``). Only
the kept tokens are projected and attended: per head ``O(k^2 d_h + k d d_h)`` plus the router's
``O(T d)``. The kept tokens are sorted by position, so the mask :math:`M_h` is the lower triangle
and the fused causal kernel runs it.

**Decoding.** Whether token ``t`` is in :math:`I_h` depends on the later tokens' scores, so the
training rule is not causal (a later token can push an earlier one out of the top-k). The released
code has no decoding path; gohgraph decides per token, by ``cfg.mosa_inference``:

* ``"aux-router"`` (Mixture-of-Recursions' auxiliary router, :mod:`gohgraph.routers.recursion`): a
  linear inference router :math:`a_{t,h} = u_h \cdot x_t + c_h`, fed a detached ``x`` and trained
  with a BCE loss (``mosa_aux_bce``, weight ``cfg.mosa_aux_loss_coef``) to predict
  :math:`t \in I_h`, keeps ``t`` when :math:`a_{t,h} > 0`;
* ``"score-threshold"``: the head's own score, kept when :math:`r_{t,h} \ge \theta_h`, where
  :math:`\theta_h` (buffer ``score_threshold``) follows the k-th largest score of each training
  sequence by an exponential moving average (:data:`THRESHOLD_MOMENTUM`, updated by training forwards
  that record a graph; both rules' statistics are kept whichever one decides).

In evaluation mode (plain forward and ``generate`` alike) the heads attend among the tokens the rule
keeps, causally, and the output keeps the weight :math:`r_{t,h}`; the train/inference gap is the
loss difference between the two rules (docs/decoding.md). How it is computed:

* a call with nothing cached before it (an evaluation forward, a generation's prompt) gathers as
  training does: each head projects and attends only the tokens the rule keeps (padded to the most
  any head keeps);
* a decode step (at most :data:`~gohgraph.layers.head_sparse.DECODE_MAX_QUERIES` tokens): only the
  heads that keep one of its tokens project it and attend, by the head-runs kernel of
  :mod:`~gohgraph.layers.head_sparse` (a trained rule keeps about one token in ``ρ``, so most heads
  read neither their weights nor the cache);
* a longer call after cached ones (a prompt fed in chunks) runs masked: every token projected, the
  keys the rule drops masked out.

The cache (its own slot per layer, :func:`sparse_cache_slot`) holds every position with the rule's
decision as one extra value channel (zeros where a head did not project the token), so the paper's
smaller KV cache is not realised here.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GoHConfig
from ..ops.selected_first import selected_first
from ..routing import TokenSelection
from .head_sparse import DECODE_MAX_QUERIES, head_sparse_attention
from .kv_cache import KVCache

MOSA_AUX = "mosa_aux_bce"  # the inference router's BCE loss, in LayerRouting.aux_losses
MIN_KEPT = 2  # the released get_topk: at least two tokens per head
FORCED = 2.0  # a ranking key above every sigmoid score: include_first's token is always chosen
# weight of each training sequence's k-th score in the score-threshold rule's moving average: about
# the last few hundred sequences count, so it follows the router as it trains
THRESHOLD_MOMENTUM = 0.01


def mosa_tokens_per_head(seq_len: int, sparsity: int) -> int:
    """``k``: tokens each sparse head keeps of a ``seq_len``-token sequence, ``min(T, max(2, T // ρ))``."""
    return min(max(seq_len // sparsity, MIN_KEPT), seq_len)


def sparse_cache_slot(cfg: GoHConfig, layer_idx: int) -> int:
    """The KV-cache slot of layer ``layer_idx``'s sparse heads (after the ``n_layers`` dense slots)."""
    return cfg.n_layers + layer_idx


class MixtureOfSparseAttention(nn.Module):
    """The sparse heads of one layer (module docstring).

    Parameters (``H_s`` sparse heads, ``d_h`` head width), laid out as the released module's:
    ``router [H_s, d_model]`` (its ``r``), ``qkv [H_s, d_model, 3 d_h]`` (its ``ExpertGather.W``:
    queries, keys, values in that order), ``out [H_s, d_h, d_model]`` (its ``ExpertScatter.W``),
    and the inference router ``inference_router`` (``d_model -> H_s``, with bias). They start as
    the attention's projections do (``init_std``; ``output_init_std`` for ``out``), not with the
    released uniform init.

    ``forward(x [batch, seq, d_model], rotary, positions, cache, mask, token_mask)`` ->
    ``(y [batch, seq, d_model], TokenSelection)``.
    """

    def __init__(self, cfg: GoHConfig, layer_idx: int) -> None:
        super().__init__()
        heads, head_dim, d_model = cfg.n_mosa_heads, cfg.head_dim, cfg.d_model
        self.n_heads, self.head_dim, self.sparsity = heads, head_dim, cfg.mosa_sparsity
        self.include_first = cfg.mosa_include_first
        self.cache_slot = sparse_cache_slot(cfg, layer_idx)
        self.dropout = cfg.dropout
        self.scale = None if cfg.attention_scale == "sqrt" else 1.0
        self.router = nn.Parameter(torch.empty(heads, d_model))
        self.qkv = nn.Parameter(torch.empty(heads, d_model, 3 * head_dim))
        self.out = nn.Parameter(torch.empty(heads, head_dim, d_model))
        self.inference_router = nn.Linear(d_model, heads)
        for param in (self.router, self.qkv, self.inference_router.weight):
            nn.init.normal_(param, std=cfg.init_std)
        nn.init.normal_(self.out, std=cfg.output_init_std)
        nn.init.zeros_(self.inference_router.bias)
        self.inference = cfg.mosa_inference
        # a sigmoid's middle: a fresh model keeps about half the tokens until training moves it
        self.register_buffer("score_threshold", torch.full((heads,), 0.5))

    def forward(self, x: torch.Tensor, rotary: Optional[nn.Module] = None, positions: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, mask: Optional[torch.Tensor] = None,
                token_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, TokenSelection]:
        """``positions [batch, seq]`` (default: the cache's length + t), ``mask`` bool broadcastable
        to ``[batch, 1, 1, keys]`` (``False``: a padded key), ``token_mask [batch, seq]`` (``False``:
        padding, never kept)."""
        # routing in float32, whatever the autocast (bf16 ties change the chosen set)
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = torch.sigmoid(F.linear(x.float(), self.router.float()))  # r [batch, seq, H_s]
        if self.training and cache is None:
            return self._expert_choice(x, scores, rotary, positions, token_mask)
        return self._per_token_rule(x, scores, rotary, positions, cache, mask, token_mask)

    # ------------------------------------------------------------------ training: expert choice
    def _expert_choice(self, x: torch.Tensor, scores: torch.Tensor, rotary: Optional[nn.Module],
                       positions: Optional[torch.Tensor], token_mask: Optional[torch.Tensor]
                       ) -> Tuple[torch.Tensor, TokenSelection]:
        batch, seq, d_model = x.shape
        heads = self.n_heads
        ranking = scores.detach()
        if token_mask is not None:  # padding ranks below every real token and is never counted
            ranking = ranking.masked_fill(~token_mask[..., None], -1.0)
        if self.include_first:
            first = (token_mask.long().argmax(-1) if token_mask is not None
                     else torch.zeros(batch, dtype=torch.long, device=x.device))
            ranking = ranking.scatter(1, first[:, None, None].expand(-1, 1, heads),
                                      ranking.new_full((batch, 1, heads), FORCED))
        if token_mask is None:
            kept_count = None
            k = mosa_tokens_per_head(seq, self.sparsity)
        else:  # each row keeps k of its own real tokens: a padded row chooses as it does alone
            real = token_mask.sum(-1)
            kept_count = torch.minimum(torch.clamp(real // self.sparsity, min=MIN_KEPT), real)  # [batch]
            k = int(kept_count.max())
        top = ranking.topk(k, dim=1)
        if torch.is_grad_enabled():  # a training step, not a no-grad look at the training rule
            self._track_threshold(top.values, kept_count, k)
        chosen = top.indices.transpose(1, 2)  # [batch, H_s, k]
        valid = None
        if kept_count is not None:  # the j-th best of a row counts while j < its own k
            rank = torch.arange(k, device=x.device)
            valid = (rank[None, :] < kept_count[:, None])[:, None, :].expand(-1, heads, -1)
        # position order: the causal mask among the kept tokens is then the lower triangle
        chosen, order = chosen.sort(dim=-1)
        if valid is not None:
            valid = valid.gather(-1, order)
        y, _, _ = self._attend_kept(x, scores, chosen, valid, rotary, positions,
                                    dropout=self.dropout if self.training else 0.0)
        selected = torch.zeros(batch, heads, seq, dtype=torch.bool, device=x.device)
        selected = selected.scatter(-1, chosen, True if valid is None else valid).transpose(1, 2)
        losses = {MOSA_AUX: self._inference_router_loss(x, selected, token_mask)}
        return y, TokenSelection(selected, scores.detach(), losses)

    def _attend_kept(self, x: torch.Tensor, scores: torch.Tensor, chosen: torch.Tensor, valid: Optional[torch.Tensor],
                     rotary: Optional[nn.Module], positions: Optional[torch.Tensor], dropout: float
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each head over its kept tokens only: ``chosen [batch, H_s, n]`` token indices in position
        order, ``valid [batch, H_s, n]`` (``None``: all real; ``False``: a pad, a distinct token that
        is nobody's key and whose output is dropped), ``scores [batch, seq, H_s]`` -> ``y [batch, seq,
        d_model]``, zero at the tokens a head did not keep, and the chosen tokens' (rotated) keys and
        values ``[batch, H_s, n, d_h]``. Only the kept tokens are projected and attended (causally
        among themselves, by position), and each output is weighted by its score."""
        batch, seq, d_model = x.shape
        heads, k = chosen.shape[1], chosen.shape[2]
        gate = scores.transpose(1, 2).gather(-1, chosen)  # r at the kept tokens, with gradient
        if valid is not None:
            gate = gate * valid
        flat = chosen.reshape(batch, heads * k)
        picked = x.gather(1, flat[..., None].expand(-1, -1, d_model)).view(batch, heads, k, d_model)
        q, key, value = torch.einsum("bhkd,hdf->bhkf", picked, self.qkv).chunk(3, dim=-1)
        kept_positions = chosen if positions is None else positions.gather(1, flat).view(batch, heads, k)
        q, key = self._rotate(rotary, q, key, kept_positions)
        if valid is None:
            attn_mask, is_causal = None, True
        else:  # padded picks are keys of nobody; a padded query sees itself (no all -inf row)
            same = torch.eye(k, dtype=torch.bool, device=x.device)
            attn_mask = (torch.ones(k, k, dtype=torch.bool, device=x.device).tril() & valid[:, :, None, :]) | same
            is_causal = False
        attn = F.scaled_dot_product_attention(q, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=self.scale, dropout_p=dropout)
        rows = torch.einsum("bhkf,hfd->bhkd", attn * gate.to(attn.dtype)[..., None], self.out)
        # in the rows' dtype: bf16 under autocast, as the projections give it (x stays float32)
        y = rows.new_zeros(batch, seq, d_model).scatter_add(1, flat[..., None].expand(-1, -1, d_model),
                                                            rows.reshape(batch, heads * k, d_model))
        return y, key, value

    @torch.no_grad()
    def _track_threshold(self, top_scores: torch.Tensor, kept_count: Optional[torch.Tensor], k: int) -> None:
        """Move ``score_threshold`` toward the batch's mean k-th largest score per head
        (``top_scores [batch, k, H_s]``, descending; include_first's forced token not counted)."""
        batch = top_scores.shape[0]
        counts = torch.full((batch,), k, device=top_scores.device) if kept_count is None else kept_count
        last = (counts - 1).clamp(min=int(self.include_first))  # the forced token ranks first
        kth = top_scores.gather(1, last[:, None, None].expand(-1, 1, top_scores.shape[-1])).squeeze(1)
        self.score_threshold.lerp_(kth.mean(0).to(self.score_threshold.dtype), THRESHOLD_MOMENTUM)

    def _inference_router_loss(self, x: torch.Tensor, selected: torch.Tensor,
                               token_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """BCE of the inference router against the top-k choice, over real tokens; it reads a
        detached ``x`` so it learns to predict the choice without shaping what it reads."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            predicted = self._rule_logits(x.detach())
            if token_mask is not None:
                return F.binary_cross_entropy_with_logits(predicted[token_mask], selected[token_mask].float())
            return F.binary_cross_entropy_with_logits(predicted, selected.float())

    def _rule_logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.inference_router.weight.float(), self.inference_router.bias.float())

    # ------------------------------------------------------------------ evaluation: the per-token rule
    def _per_token_rule(self, x: torch.Tensor, scores: torch.Tensor, rotary: Optional[nn.Module],
                        positions: Optional[torch.Tensor], cache: Optional[KVCache], mask: Optional[torch.Tensor],
                        token_mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, TokenSelection]:
        batch, seq, _ = x.shape
        offset = cache.length(self.cache_slot) if cache is not None else 0
        if self.inference == "score-threshold":
            kept = scores >= self.score_threshold.float()  # [batch, seq, H_s]
        else:
            with torch.autocast(device_type=x.device.type, enabled=False):
                kept = self._rule_logits(x) > 0
        token_positions = (positions if positions is not None
                           else torch.arange(offset, offset + seq, device=x.device).expand(batch, seq))
        if self.include_first:
            kept = kept | (token_positions == 0)[..., None]
        if token_mask is not None:
            kept = kept & token_mask[..., None]
        # gathered where nothing is cached yet (an evaluation forward, a generation's prompt); padding
        # is in `kept` already, so a key mask is redundant with the token mask
        if offset == 0 and (mask is None or token_mask is not None):
            y = self._gathered_rule(x, scores, kept, rotary, token_positions, cache)
            return y, TokenSelection(kept, scores.detach())
        decoding = seq <= DECODE_MAX_QUERIES
        # a decode step: only the heads that keep one of its tokens project and attend (another head's
        # key is masked out of every later step and its output is gated to 0: never read)
        heads = kept.flatten(0, 1).any(0).nonzero().squeeze(-1) if decoding else None  # one host sync
        q, key, value = self._project(x, token_positions, rotary, heads)
        kept_keys = kept.transpose(1, 2)  # [batch, H_s, seq]
        if cache is not None:  # the rule's decision travels with the values, so any cache kind holds it
            key, flagged = cache.append(self.cache_slot, key, torch.cat([value, kept_keys[..., None].to(value.dtype)], -1))
            value, kept_keys = flagged[..., :-1], flagged[..., -1] > 0.5
        total = key.shape[2]
        query_pos = torch.arange(total - seq, total, device=x.device)[:, None]
        key_pos = torch.arange(total, device=x.device)[None, :]
        allowed = (key_pos <= query_pos) & kept_keys[:, :, None, :]
        if mask is not None:
            allowed = allowed & mask[..., -total:]
        allowed = allowed | (key_pos == query_pos)  # a dropped query sees itself (its output is not used)
        gate, out = (scores * kept).transpose(1, 2), self.out  # gate [batch, H_s, seq]
        if decoding:  # the head-runs kernel reads only the kept heads' cache rows (views)
            attn = head_sparse_attention(q, key, value, kept, 0, allowed, False, causal_keys=False, scale=self.scale)
            attn, gate, out = attn.index_select(1, heads), gate.index_select(1, heads), out.index_select(0, heads)
        else:
            attn = F.scaled_dot_product_attention(q, key, value, attn_mask=allowed, scale=self.scale)
        y = torch.einsum("bhtf,hfd->btd", attn * gate.to(attn.dtype)[..., None], out)
        return y, TokenSelection(kept, scores.detach())

    def _project(self, x: torch.Tensor, positions: torch.Tensor, rotary: Optional[nn.Module],
                 heads: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values ``[batch, H_s, seq, d_h]`` of every token of ``x [batch, seq,
        d_model]``, rotated at ``positions [batch, seq]``; with ``heads`` (indices) only those heads
        are projected, the others' rows are zeros."""
        weights = self.qkv if heads is None else self.qkv.index_select(0, heads)
        q, key, value = torch.einsum("btd,hdf->bhtf", x, weights).chunk(3, dim=-1)
        q, key = self._rotate(rotary, q, key, positions[:, None, :].expand(-1, weights.shape[0], -1))
        if heads is None:
            return q, key, value
        batch, seq = x.shape[:2]

        def every_head(part: torch.Tensor) -> torch.Tensor:
            return part.new_zeros(batch, self.n_heads, seq, self.head_dim).index_copy(1, heads, part)
        return every_head(q), every_head(key), every_head(value)

    def _gathered_rule(self, x: torch.Tensor, scores: torch.Tensor, kept: torch.Tensor, rotary: Optional[nn.Module],
                       positions: torch.Tensor, cache: Optional[KVCache]) -> torch.Tensor:
        """The per-token rule's output over the call's tokens alone, computed on the kept tokens only
        (:meth:`_attend_kept`): ``kept [batch, seq, H_s]``, ``positions [batch, seq]`` -> ``y [batch,
        seq, d_model]``. Each head's kept tokens come first in position order, padded to the most any
        head keeps. With an (empty) ``cache`` the keys and values go in too: the computed ones at
        their tokens, zeros at the rest, which the decision channel masks out of every later step."""
        batch, seq, _ = x.shape
        kept_by_head = kept.transpose(1, 2)  # [batch, H_s, seq]
        most = int(kept_by_head.sum(-1).max())  # one host sync
        chosen = selected_first(kept_by_head)[..., :most]
        if most:
            y, key, value = self._attend_kept(x, scores, chosen, kept_by_head.gather(-1, chosen), rotary,
                                              positions, dropout=0.0)
        else:
            y = torch.zeros_like(x)  # nothing kept: no head writes anything
        if cache is not None:
            slots = chosen[..., None].expand(-1, -1, -1, self.head_dim)
            dtype = key.dtype if most else x.dtype  # what the projections give (bf16 under autocast)
            keys = x.new_zeros(batch, self.n_heads, seq, self.head_dim, dtype=dtype)
            values = x.new_zeros(batch, self.n_heads, seq, self.head_dim, dtype=dtype)
            if most:
                keys, values = keys.scatter(2, slots, key), values.scatter(2, slots, value)
            cache.append(self.cache_slot, keys, torch.cat([values, kept_by_head[..., None].to(values.dtype)], -1))
        return y

    @staticmethod
    def _rotate(rotary: Optional[nn.Module], q: torch.Tensor, key: torch.Tensor, positions: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """RoPE at each head's own token positions ``[batch, H_s, len]`` (``q, key [batch, H_s, len, d_h]``)."""
        if rotary is None:
            return q, key
        batch, heads, length, dim = q.shape
        flat = positions.reshape(batch * heads, length)
        q = rotary.rotate(q.reshape(batch * heads, 1, length, dim), flat).view(batch, heads, length, dim)
        key = rotary.rotate(key.reshape(batch * heads, 1, length, dim), flat).view(batch, heads, length, dim)
        return q, key

    def extra_repr(self) -> str:
        return f"sparse_heads={self.n_heads}, head_dim={self.head_dim}, sparsity={self.sparsity}"
