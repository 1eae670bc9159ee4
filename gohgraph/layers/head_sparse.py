r"""Head-sparse attention: attend only for the (token, head) pairs the router chose (docs/skipping-work.md).

With gates :math:`g_{t,h}` (0 outside token ``t``'s active set :math:`A_t`), a routed layer needs

.. math::
    o_{t,h} = \mathrm{softmax}\big(q_{t,h} K_h^\top \cdot s + \mathrm{mask}_{t}\big) V_h
    \quad \text{only for } h \in A_t,

while the keys and values :math:`K_h, V_h` of every token stay computed and cached (a head inactive
for one token may be active for the next). :func:`head_sparse_attention` returns the same
``[batch, heads, q_len, d_v]`` tensor as the masked reference (SDPA over every head) on the active
pairs and zeros elsewhere, so the gates and the head-mixing matrix that follow (whose columns
outside :math:`A_t` are zero) give the same layer output and the same gradients.

Three kernels: two eager ones, picked by the number of queries, and one for ``torch.compile``:

* **head runs** (decoding, ``q_len <= DECODE_MAX_QUERIES``): per batch row, the heads active for
  any of its queries form runs of consecutive heads; each run attends by two batched matmuls on
  *views* of the cache, writing into the layer's output in place (copying the active heads' cache
  rows out first costs more than it saves, and CPU's fused kernel gives a one-query head a single
  thread), so a step reads only the active heads' keys and values.
* **query chunks** (training, prefill): the always-on (shared) heads run the fused kernel over every
  query. For the routed heads the queries are cut into chunks of ``QUERY_CHUNK`` positions; in a
  chunk each routed head gathers its active queries (padded to the chunk's busiest head, the pads
  are inactive queries whose output is dropped) and attends to the keys up to the chunk's end with
  an explicit mask (causality by original position, padding, windows, ALiBi/T5 biases: whatever the
  reference mask holds). Chunking keeps the fused kernel's causal block skipping up to one chunk,
  so the routed heads cost about ``(active share) * (1 + chunk / q_len)`` of their dense work.
* **gathered heads** (the compiled decode step, :func:`gathered_head_attention`): the kernels above
  branch on the routing, which a compiled graph cannot; but with top-k routing every token keeps at
  most ``shared + k`` heads, a static count, so the step gathers that many heads by index, written
  as reductions that Inductor fuses with the gathers (only the active heads' cache rows are read).

What stays dense: the query projection (the graph and query-norm routers read every head's query)
and the output projection (in training and prefill it reads the heads' outputs after the gates and
the inter-head flow; at decode, reading only the active heads' columns of ``W_O`` by one matmul per
run of heads measured 2.5% slower per token than the one full matmul, BENCHMARKS.md).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..ops.selected_first import selected_first

# queries per chunk of the routed heads in training / prefill: measured on 2 CPU cores at 4,096
# tokens, 512 and 1,024 were within noise of each other and 256 slower (more calls, smaller GEMMs)
QUERY_CHUNK = 512
# CausalRoutedAttention pads a group of heads' queries to its busiest head up to this share of the
# group's work; an unevenly loaded head starts a group of its own (a call more, fewer padded rows)
PAD_TOLERANCE = 0.25
# up to this many queries per call the head-runs kernel is used (a decode step, or a few tokens)
DECODE_MAX_QUERIES = 4
# "auto" decodes head-sparse when the cache rows it skips, keys x share of (query, head) pairs off,
# reach this many (below, the per-run calls cost what the skipped reads save). Measured in the model
# on 2 CPU cores, d_model 768, 4 layers (BENCHMARKS.md, "Routing that skips work"): 8 of 12 heads
# after 1,024 keys (341 skipped) was slower than masked, 4 of 12 after 1,024 (683) and 8 of 12
# after 2,048 (683) paid, 4 of 12 after 512 (341) did not
MIN_SKIPPED_DECODE_KEYS = 512
# ... and the compiled decode step gathers its active heads (gathered_head_attention) from this many
# skipped cache rows: measured (benchmarks/results/head_sparse_compiled_decode*.md) no slower than the
# compiled masked step at 176 skipped rows (8 of 12 heads after 512 keys), faster from 341 on;
# below, not measured
MIN_GATHERED_DECODE_KEYS = 128
# ... and runs the query-chunk kernel (training, prefill) from this many queries on: None = never.
# Measured on 2 CPU cores (benchmarks/results/head_sparse_train_session12.md): it cuts the step's
# FLOPs by 10% at 8 of 12 heads but a 2-layer step's time by at most 2.4% (MoH at 4,096 tokens),
# is slower than masked at 1,024 tokens and for a fresh graph router's uneven loads (GoH)
MIN_SPARSE_QUERIES: Optional[int] = None


def picks_head_sparse(mode: str, head_gates: torch.Tensor, q_len: int, k_len: int, dropout: float = 0.0,
                      mixes_heads: bool = False) -> bool:
    """The one rule that picks head-sparse or masked execution for a call (``cfg.head_execution``).

    ``"masked"`` never skips; ``"sparse"`` skips whenever it can; ``"auto"`` skips when it can and
    where it was measured to pay: a decode step whose skipped cache rows (keys x share of pairs off)
    reach :data:`MIN_SKIPPED_DECODE_KEYS` (and calls of at least :data:`MIN_SPARSE_QUERIES` queries,
    never by default on CPU). It cannot (masked then) while the dense blend anneals
    (every head carries weight), under attention dropout (the reference draws one mask for all
    heads), with talking heads
    (``mixes_heads``: every head's logits and weights mix into every other head, so an inactive
    head's scores are still needed; the config refuses ``"sparse"`` with them) and inside
    ``torch.compile`` (the kernels branch on the routing; there :func:`picks_gathered_heads` decides).
    """
    if mode == "masked" or dropout > 0 or mixes_heads or torch.compiler.is_compiling():
        return False
    decoding = q_len <= DECODE_MAX_QUERIES
    if mode == "auto" and (k_len < MIN_SKIPPED_DECODE_KEYS if decoding else
                           MIN_SPARSE_QUERIES is None or q_len < MIN_SPARSE_QUERIES):
        return False  # decided by the shapes alone: no op, no host sync (small decode steps are op-bound)
    off = float(head_gates.eq(0).float().mean())  # one host sync; a dense blend > 0 leaves no gate at 0
    if off == 0.0:
        return False
    return mode == "sparse" or not decoding or k_len * off >= MIN_SKIPPED_DECODE_KEYS


def picks_gathered_heads(mode: str, most_active: Optional[int], heads: int, q_len: int, k_len: int,
                         dropout: float = 0.0, sharded: bool = False, mixes_heads: bool = False) -> bool:
    """The rule inside ``torch.compile`` (where :func:`picks_head_sparse` says masked): a one-query
    step whose tokens have at most ``most_active`` of ``heads`` heads active (``None``: not a fixed
    count) runs :func:`gathered_head_attention`. ``"auto"`` does so from :data:`MIN_GATHERED_DECODE_KEYS`
    skipped cache rows (keys x share of heads off); never under attention dropout, tensor
    parallelism or talking heads (see :func:`picks_head_sparse`)."""
    if (mode == "masked" or most_active is None or q_len != 1 or dropout > 0 or sharded or mixes_heads
            or not torch.compiler.is_compiling()):
        return False
    return mode == "sparse" or k_len * (heads - most_active) / heads >= MIN_GATHERED_DECODE_KEYS


def head_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, active: torch.Tensor,
                          n_always_on: int, attn_mask: Optional[torch.Tensor], is_causal: bool,
                          causal_keys: bool, scale: Optional[float]) -> torch.Tensor:
    """Attention of the active (token, head) pairs; zeros elsewhere.

    Args:
        q: ``[batch, heads, q_len, d]``.
        k, v: ``[batch, kv_heads, k_len, d]`` and ``[batch, kv_heads, k_len, d_v]`` (GQA/MQA when
            ``kv_heads < heads``: query head ``h`` reads kv head ``h // (heads / kv_heads)``).
        active: ``[batch, q_len, heads]`` bool, the pairs that must be computed (more may be).
        n_always_on: the first heads are active for every token (MoH's shared heads): they run the
            fused kernel.
        attn_mask, is_causal: what :func:`~gohgraph.layers.attention.attention_mask` returns for
            these queries (a bool or additive mask broadcastable to ``[batch, heads, q_len, k_len]``).
        causal_keys: query ``t`` sees no key after position ``k_len - q_len + t`` (causal
            self-attention with the queries at the end of the keys), so a chunk's keys end at its last query.
        scale: SDPA's ``scale``.
    Returns:
        ``[batch, heads, q_len, d_v]``.
    """
    if q.shape[2] <= DECODE_MAX_QUERIES:
        out = _attend_by_head_runs(q, k, v, active_head_flags(active), attn_mask, is_causal, scale)
        return out if q.shape[2] == 1 else out * active.transpose(1, 2).unsqueeze(-1).to(out.dtype)
    return _attend_by_query_chunks(q, k, v, active, n_always_on, attn_mask, is_causal, causal_keys, scale)


def active_head_flags(active: torch.Tensor) -> List[List[bool]]:
    """``active [batch, q_len, heads]`` -> per batch row, per head: active for any of its queries
    (a host copy, one sync: the decode kernels loop over runs of heads in Python)."""
    return active.any(dim=1).tolist()


def _as_4d(attn_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    while attn_mask is not None and attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask


def _mask_rows(attn_mask: Optional[torch.Tensor], row: int, heads: slice) -> Optional[torch.Tensor]:
    """``attn_mask [B|1, H|1, q, k]`` for one batch row and a range of heads (broadcast dims kept)."""
    if attn_mask is None:
        return None
    m = attn_mask[row:row + 1] if attn_mask.shape[0] > 1 else attn_mask
    return m[:, heads] if m.shape[1] > 1 else m


def _head_runs(flags: List[bool], group: int) -> List[range]:
    """Maximal runs of consecutive True heads, split at kv-group boundaries."""
    runs, start = [], None
    for h, on in enumerate(flags + [False]):
        if on and start is not None and group > 1 and h % group == 0:
            runs.append(range(start, h))
            start = h
        elif on and start is None:
            start = h
        elif not on and start is not None:
            runs.append(range(start, h))
            start = None
    return runs


def _attend_by_head_runs(q, k, v, head_flags, attn_mask, is_causal, scale) -> torch.Tensor:
    """Per batch row, each run of active heads by :func:`_run_attention`, written into a zero output
    (inactive heads stay 0). The scale is folded into the few queries once, not into every run's scores."""
    batch, heads, q_len, d = q.shape
    group = heads // k.shape[1]
    attn_mask = _as_4d(attn_mask)
    scale = d ** -0.5 if scale is None else scale
    if scale != 1.0:
        q = q * scale
    out = q.new_zeros(batch, heads, q_len, v.shape[-1])
    for b in range(batch):
        # one row's views taken once, not per run (a decode step is bound by per-op overhead at short contexts)
        q_row, keys_t, values, out_row = q[b], k[b].transpose(1, 2), v[b], out[b]
        for run in _head_runs(head_flags[b], group):
            heads_run = slice(run.start, run.stop)
            kv = heads_run if group == 1 else slice(run.start // group, run.start // group + 1)
            _run_attention(q_row[heads_run], keys_t[kv], values[kv], _mask_rows(attn_mask, b, heads_run),
                           is_causal, out_row[heads_run])
    return out


def _run_attention(q, keys_t, v, attn_mask, is_causal, out) -> None:
    """``out = softmax(q k^T + mask) v`` by two batched matmuls, for a run of heads with a few
    (already scaled) queries each: ``q [run, q_len, d]``, ``keys_t [run | 1, d, k_len]`` (the keys,
    transposed), ``v [run | 1, k_len, d_v]`` (one kv head under GQA, whose keys every query of the
    run shares: one GEMM), ``out [run, q_len, d_v]`` (a view of the layer's output, written in place).

    With one query per head, CPU's fused kernel gives each head one thread, so a run of one head
    leaves the other threads idle; the matmuls split the keys over every thread instead (one query
    over 8,192 keys, 8 of 12 heads in 4 runs, 2 threads: 1.94 ms by SDPA per run, 1.62 ms by matmuls,
    2.34 ms for dense SDPA over all heads). Scores and softmax in float32 (as the fused kernel
    accumulates)."""
    run, q_len, _ = q.shape
    shared_kv = v.shape[0] != run
    if shared_kv:  # GQA: the run's queries against its one kv head
        q = q.reshape(1, run * q_len, -1)
    scores = torch.bmm(q, keys_t).view(run, q_len, -1)  # [run, q_len, k_len]
    if scores.dtype != torch.float32 and scores.dtype != torch.float64:
        scores = scores.float()
    if is_causal:
        scores.masked_fill_(torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1),
                            float("-inf"))
    if attn_mask is not None:
        attn_mask = attn_mask[0]  # [run | 1, q_len, k_len]
        if attn_mask.dtype == torch.bool:
            scores.masked_fill_(attn_mask.logical_not(), float("-inf"))
        else:
            scores += attn_mask.to(scores.dtype)
    weights = torch.softmax(scores, dim=-1)
    if weights.dtype != v.dtype:
        weights = weights.to(v.dtype)
    if shared_kv:
        _product_into(torch.bmm, weights.view(1, run * q_len, -1), v, out.view(1, run * q_len, -1))
    else:
        _product_into(torch.bmm, weights, v, out)


def _product_into(product, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out[...] = product(a, b)``: straight into ``out`` when no gradient is recorded (decoding),
    else through a copy (``out=`` variants record no gradient)."""
    if torch.is_grad_enabled():
        out.copy_(product(a, b))
    else:
        product(a, b, out=out)


def gathered_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, active: torch.Tensor,
                            n_active: int, attn_mask: Optional[torch.Tensor], scale: Optional[float]) -> torch.Tensor:
    r"""One query per row over the ``n_active`` heads gathered by index, for ``torch.compile``.

    The compiled decode step (:mod:`gohgraph.models.compiled_decode`) needs the same shapes at
    every step, and with top-k routing every token has at most ``n_active`` active heads. So each
    row's active heads are picked by index (the first ``n_active`` of a stable sort; inactive heads
    fill up a row with fewer, and their output is set to 0), and
    the scores and the weighted values are written as reductions over the gathered rows,

    .. math::
        s_{a,t} = \sum_d q_{a,d} K_{h_a,t,d}\, s, \qquad o_a = \sum_t \mathrm{softmax}(s_a)_t V_{h_a,t},

    which Inductor fuses with the gathers into loops that read only the active heads' cache rows
    (an eager gather would copy them first: more traffic than it saves).

    Args:
        q: ``[batch, heads, 1, d]``; k, v: ``[batch, kv_heads, k_len, d | d_v]`` (GQA: query head
            ``h`` reads kv head ``h // (heads / kv_heads)``).
        active: ``[batch, 1, heads]`` bool, at most ``n_active`` true per row.
        attn_mask: bool or additive, broadcastable to ``[batch, heads, 1, k_len]`` (one mask for
            every head: the compiled step's key mask).
    Returns:
        ``[batch, heads, 1, d_v]``, zeros on the heads not gathered.
    """
    batch, heads, _, d = q.shape
    group = heads // k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    index = selected_first(active[:, 0])[:, :n_active]  # [batch, A]
    queries = q[:, :, 0].gather(1, index[..., None].expand(batch, n_active, d)) * scale  # [batch, A, d]
    kv_index = index if group == 1 else index // group
    keys = k.gather(1, kv_index[:, :, None, None].expand(batch, n_active, k.shape[2], d))
    values = v.gather(1, kv_index[:, :, None, None].expand(batch, n_active, v.shape[2], v.shape[3]))
    scores = (queries[:, :, None, :] * keys).sum(-1)  # [batch, A, k_len]
    if scores.dtype != torch.float32 and scores.dtype != torch.float64:
        scores = scores.float()
    if attn_mask is not None:
        mask = _as_4d(attn_mask)[:, 0, 0]  # [batch | 1, k_len]: the same for every head
        mask = mask[:, None, :]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(scores.dtype)
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    kept = active[:, 0].gather(1, index)  # [batch, A]: false on the heads that only fill a row up
    gathered = (weights[..., None] * values).sum(-2) * kept[..., None].to(v.dtype)  # [batch, A, d_v]
    out = q.new_zeros(batch, heads, v.shape[-1]).scatter(1, index[..., None].expand_as(gathered), gathered)
    return out[:, :, None]


def _attend_by_query_chunks(q, k, v, active, n_always_on, attn_mask, is_causal, causal_keys, scale) -> torch.Tensor:
    batch, heads, q_len, _ = q.shape
    kv_heads, k_len, d_v = k.shape[1], k.shape[2], v.shape[-1]
    group = heads // kv_heads
    attn_mask = _as_4d(attn_mask)
    # heads whose kv heads form a whole number of groups can be sliced as views
    always = n_always_on - n_always_on % group
    parts = []
    if always:
        parts.append(F.scaled_dot_product_attention(
            q[:, :always], k[:, :always // group], v[:, :always // group], is_causal=is_causal, scale=scale,
            attn_mask=None if attn_mask is None else attn_mask[:, :always] if attn_mask.shape[1] > 1 else attn_mask,
            enable_gqa=group > 1))
    routed = heads - always
    # the fused CPU kernel takes one head size for q, k and v
    if routed and is_causal and attn_mask is None and group == 1 and q.device.type == "cpu" \
            and q.shape[-1] == v.shape[-1]:
        parts.append(CausalRoutedAttention.apply(q[:, always:], k[:, always:], v[:, always:],
                                                 active[:, :, always:].transpose(1, 2), scale))
    elif routed:
        parts.append(_routed_chunks(q[:, always:], k[:, always // group:], v[:, always // group:],
                                    active[:, :, always:], _heads_of(attn_mask, always), is_causal, causal_keys,
                                    scale, group, k_len, d_v))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _heads_of(attn_mask: Optional[torch.Tensor], first: int) -> Optional[torch.Tensor]:
    if attn_mask is None or attn_mask.shape[1] == 1:
        return attn_mask
    return attn_mask[:, first:]


def _routed_chunks(q, k, v, active, attn_mask, is_causal, causal_keys, scale, group, k_len, d_v) -> torch.Tensor:
    """The routed heads ``q [batch, routed, q_len, d]`` chunk by chunk (see the module docstring)."""
    batch, routed, q_len, d = q.shape
    offset = k_len - q_len  # queries sit at the end of the keys
    head_ids = torch.arange(routed, device=q.device)[:, None]
    key_pos = torch.arange(k_len, device=q.device)
    per_head_active = active.transpose(1, 2)  # [batch, routed, q_len]
    counts = [per_head_active[:, :, c:c + QUERY_CHUNK].sum(-1).amax(-1).tolist()
              for c in range(0, q_len, QUERY_CHUNK)]  # [chunk][batch]: one host sync per chunk
    index_b, index_h, index_t, outputs = [], [], [], []
    for chunk, start in enumerate(range(0, q_len, QUERY_CHUNK)):
        stop = min(q_len, start + QUERY_CHUNK)
        keys_end = offset + stop if causal_keys else k_len
        for b in range(batch):
            n = int(counts[chunk][b])
            if n == 0:
                continue
            chunk_active = per_head_active[b, :, start:stop]  # [routed, chunk]
            order = selected_first(chunk_active)[:, :n]  # per head its active queries first
            valid = chunk_active.gather(1, order)
            pos = order + start  # [routed, n] query indices
            queries = q[b][head_ids, pos]  # [routed, n, d]
            keys, values = k[b, :, :keys_end], v[b, :, :keys_end]
            if attn_mask is not None:
                rows = attn_mask[b if attn_mask.shape[0] > 1 else 0]
                rows = rows.expand(routed, q_len, rows.shape[-1])[head_ids, pos][..., :keys_end]
            elif is_causal:  # additive, not bool: SDPA converts a bool mask in forward and again in backward
                rows = q.new_zeros(routed, n, keys_end).masked_fill_(key_pos[:keys_end] > (pos + offset)[..., None],
                                                                     float("-inf"))
            else:
                rows = None
            out = F.scaled_dot_product_attention(queries[None], keys[None], values[None],
                                                 attn_mask=None if rows is None else rows[None],
                                                 scale=scale, enable_gqa=group > 1)[0]
            outputs.append(out * valid.unsqueeze(-1).to(out.dtype))
            index_b.append(torch.full_like(pos, b))
            index_h.append(head_ids.expand_as(pos))
            index_t.append(pos)
    result = q.new_zeros(batch, routed, q_len, d_v)
    if not outputs:
        return result
    # every (row, head, position) appears at most once: a head's pads are distinct inactive positions
    return result.index_put((torch.cat([i.flatten() for i in index_b]), torch.cat([i.flatten() for i in index_h]),
                             torch.cat([i.flatten() for i in index_t])),
                            torch.cat([o.reshape(-1, d_v) for o in outputs]))


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class CausalRoutedAttention(torch.autograd.Function):
    r"""Plain causal attention of routed heads for their active queries only, on CPU's fused kernel.

    Chunk ``[s, e)`` is split by keys: its active queries attend to the **prefix** ``[0, s)`` without
    a mask (the fastest kernel), and every query of the chunk attends to the **diagonal** keys
    ``[s, e)`` under SDPA's own causal kernel (``chunk / seq`` of the work). The two softmaxes are
    merged by their log-sum-exps,

    .. math::
        o = w_p o_p + w_d o_d, \quad w_x = e^{\ell_x - \ell}, \quad \ell = \log(e^{\ell_p} + e^{\ell_d}),

    which is exactly attention over ``[0, e)``. Backward runs the kernel's own backward on each piece
    with ``grad_out = w_x dO`` and ``out = o`` (the merged output): the kernel's
    :math:`D = \mathrm{rowsum}(dO \odot o)` is then the merged softmax's, so each piece's gradients are
    exactly its share of the full attention's.

    A chunk's prefix runs one call per group of *consecutive* routed heads (:func:`_head_slices`), so
    the keys and values are views of the prefix (no copy) and their gradients add into it directly
    (gathering the keys and values of heads grouped by load copied about 60 MB per layer at 4,096
    tokens). In a group each head's active queries come first (in order), padded to the group's
    busiest head with inactive ones whose output is dropped and whose gradient is zero; a head is
    put in a group of its own where padding would waste more than :data:`PAD_TOLERANCE` of the
    group's work (unevenly loaded heads, as a fresh graph router's), and heads without an active
    query are left out.

    Shapes: ``q, k, v [batch, routed, seq, d]`` (keys at the queries' positions), ``active [batch,
    routed, seq]`` bool -> ``[batch, routed, seq, d]``, zeros at inactive pairs.
    """

    @staticmethod
    def forward(ctx, q, k, v, active, scale):
        batch, routed, seq, _ = q.shape
        d_v = v.shape[-1]
        out = q.new_zeros(batch, routed, seq, d_v)
        pieces = []
        for b in range(batch):
            for start in range(0, seq, QUERY_CHUNK):
                stop = min(seq, start + QUERY_CHUNK)
                diag_out, diag_lse = _flash(q[b:b + 1, :, start:stop], k[b:b + 1, :, start:stop],
                                            v[b:b + 1, :, start:stop], 0.0, True, scale=scale)
                chunk_active = active[b, :, start:stop]  # [routed, chunk]
                groups = _head_slices(chunk_active.sum(-1).tolist()) if start > 0 else []  # one host sync
                if not groups:  # no prefix (or no active query): the diagonal call is the whole attention
                    out[b, :, start:stop] = diag_out[0] * chunk_active.unsqueeze(-1).to(out.dtype)
                    pieces.append((b, start, stop, diag_out, diag_lse, []))
                    continue
                by_activity = selected_first(chunk_active)  # per head its active queries first
                prefixes = []
                for heads, busiest in groups:
                    pos = by_activity[heads, :busiest]  # [group, n] positions in the chunk
                    valid = chunk_active[heads].gather(1, pos)
                    rows = start + pos
                    prefix_out, prefix_lse = _flash(_rows_of(q[b, heads], rows)[None], k[b:b + 1, heads, :start],
                                                    v[b:b + 1, heads, :start], 0.0, False, scale=scale)
                    part_out, part_lse = _rows_of(diag_out[0, heads], pos), diag_lse[0, heads].gather(1, pos)
                    lse = torch.logaddexp(prefix_lse[0], part_lse)
                    merged = (torch.exp(prefix_lse[0] - lse).unsqueeze(-1) * prefix_out[0]
                              + torch.exp(part_lse - lse).unsqueeze(-1) * part_out)
                    merged = merged * valid.unsqueeze(-1).to(merged.dtype)
                    # every (head, row) at most once: a head's pads are distinct inactive positions
                    out[b, heads].scatter_(1, _row_index(rows, d_v), merged.to(out.dtype))
                    prefixes.append((heads, pos, valid, prefix_lse, lse))
                pieces.append((b, start, stop, diag_out, diag_lse, prefixes))
        ctx.save_for_backward(q, k, v, out, active)
        ctx.pieces, ctx.scale = pieces, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, active = ctx.saved_tensors
        scale = ctx.scale
        d, d_v = q.shape[-1], v.shape[-1]
        grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for b, start, stop, diag_out, diag_lse, prefixes in ctx.pieces:
            # rows of queries that were not kept get grad 0, so the kernel's D (and their share) is 0
            chunk_active = active[b, :, start:stop].unsqueeze(-1).to(grad_out.dtype)
            diag_grad = (grad_out[b, :, start:stop] * chunk_active)[None].contiguous()
            diag_merged = diag_out.clone() if prefixes else diag_out
            for heads, pos, valid, prefix_lse, lse in prefixes:
                rows = start + pos
                grad_rows = _rows_of(grad_out[b, heads], rows) * valid.unsqueeze(-1).to(grad_out.dtype)
                out_rows = _rows_of(out[b, heads], rows)
                diag_merged[0, heads].scatter_(1, _row_index(pos, d_v), out_rows.to(diag_out.dtype))
                part_lse = diag_lse[0, heads].gather(1, pos)
                diag_grad[0, heads].scatter_(1, _row_index(pos, d_v),
                                             (torch.exp(part_lse - lse).unsqueeze(-1) * grad_rows).to(diag_grad.dtype))
                prefix_grad = (torch.exp(prefix_lse[0] - lse).unsqueeze(-1) * grad_rows)[None].to(q.dtype)
                dq, dk, dv = _flash_backward(prefix_grad, _rows_of(q[b, heads], rows)[None], k[b:b + 1, heads, :start],
                                             v[b:b + 1, heads, :start], out_rows[None].to(q.dtype), prefix_lse, 0.0,
                                             False, scale=scale)
                grad_q[b, heads].scatter_add_(1, _row_index(rows, d), dq[0])
                grad_k[b, heads, :start] += dk[0]
                grad_v[b, heads, :start] += dv[0]
            dq, dk, dv = _flash_backward(diag_grad, q[b:b + 1, :, start:stop], k[b:b + 1, :, start:stop],
                                         v[b:b + 1, :, start:stop], diag_merged, diag_lse, 0.0, True, scale=scale)
            grad_q[b, :, start:stop] += dq[0]
            grad_k[b, :, start:stop] += dk[0]
            grad_v[b, :, start:stop] += dv[0]
        return grad_q, grad_k, grad_v, None, None


def _head_slices(loads: List[int]) -> List[Tuple[slice, int]]:
    """Groups of consecutive heads for :class:`CausalRoutedAttention`'s prefix calls, from each head's
    number of active queries in a chunk: ``(heads, busiest)``, the heads as a slice and the largest
    load among them. A group ends before a head without active queries (left out) and before a
    head whose joining would pad more than :data:`PAD_TOLERANCE` of the group's work."""
    groups: List[Tuple[slice, int]] = []
    first, busiest, total = None, 0, 0
    for head, load in enumerate(loads):
        if first is not None:
            size, top = head - first + 1, max(busiest, load)
            if load == 0 or size * top - (total + load) > PAD_TOLERANCE * size * top:
                groups.append((slice(first, head), busiest))
                first = None
        if load and first is None:
            first, busiest, total = head, load, load
        elif load:
            busiest, total = max(busiest, load), total + load
    if first is not None:
        groups.append((slice(first, len(loads)), busiest))
    return groups


def _row_index(rows: torch.Tensor, width: int) -> torch.Tensor:
    """``rows [heads, n]`` -> the ``gather``/``scatter`` index ``[heads, n, width]`` along dim 1."""
    return rows.unsqueeze(-1).expand(*rows.shape, width)


def _rows_of(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x [heads, seq, d]`` at ``rows [heads, n]`` (per head its own rows) -> ``[heads, n, d]``."""
    return x.gather(1, _row_index(rows, x.shape[-1]))
