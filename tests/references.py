"""Independent references the tests compare the fast paths with: slow, written from scratch, obviously right.

Each one restates the math of the docs in the plainest code (loops, einsum, explicit masks) and
shares no code with the package beyond reading a module's weights.
"""

import hashlib
import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

from gohgraph.routers.experts import GraphExpertRouter, LinearExpertRouter


def reference_mha(x, qkv_weight, out_weight, heads, kv_heads, theta=10000.0):
    """Plain causal multi-head attention with RoPE, written from scratch for the test."""
    batch, seq, d = x.shape
    hd = d // heads
    q, k, v = (x @ qkv_weight.t()).split([heads * hd, kv_heads * hd, kv_heads * hd], -1)
    q = q.view(batch, seq, heads, hd).transpose(1, 2)
    k = k.view(batch, seq, kv_heads, hd).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    v = v.view(batch, seq, kv_heads, hd).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    pos = torch.arange(seq, dtype=torch.float32)
    freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angle = torch.outer(pos, freq)
    cos, sin = angle.cos(), angle.sin()

    def rope(t):
        a, b = t[..., :hd // 2], t[..., hd // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    q, k = rope(q), rope(k)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1), float("-inf"))
    out = torch.softmax(scores, -1) @ v
    return out.transpose(1, 2).reshape(batch, seq, d) @ out_weight.t()


def einsum_head_router(router, q: torch.Tensor):
    """The router's math written independently: dense adjacency, einsum, explicit loops-free softmax."""
    heads = router.n_heads
    adjacency = torch.eye(heads, dtype=torch.bool)
    for src, dst in router.edge_index.t().tolist():
        adjacency[dst, src] = True
    z = torch.einsum("nhd,fd->nhf", q, router.node_in.weight) + router.head_embedding
    for r in range(router.rounds):
        h = torch.einsum("nhf,gf->nhg", z, router.round_lin[r].weight)
        e = torch.einsum("nif,f->ni", h, router.att_dst[r])[:, :, None] + \
            torch.einsum("njf,f->nj", h, router.att_src[r])[:, None, :]
        e = F.leaky_relu(e, 0.2).masked_fill(~adjacency, float("-inf"))
        alpha = torch.softmax(e, dim=-1)  # [tokens, dst, src]
        z = z + F.gelu(torch.einsum("nij,njf->nif", alpha, h) + router.round_bias[r])
    logits = torch.einsum("nhf,f->nh", z, router.score.weight[0]) + router.head_bias
    src, dst = router.edge_index
    return logits, alpha[:, dst, src]


def reference_expert(x, w_in, w_out, activation):
    hidden = x @ w_in
    if activation == "swiglu":
        gate, up = hidden.chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w_out
    return F.gelu(hidden) @ w_out


def reference_drops(ids, n_experts, capacity):
    """Walk the assignments in flat order (position, then rank); each expert keeps its first ``capacity``."""
    drops = torch.zeros(ids.shape, dtype=torch.bool)
    if capacity is None:
        return drops
    taken = [0] * n_experts
    for s in range(ids.shape[0]):
        for r in range(ids.shape[1]):
            e = int(ids[s, r])
            if taken[e] >= capacity:
                drops[s, r] = True
            else:
                taken[e] += 1
    return drops


def reference_moe(x, ids, weights, experts, drops):
    """Loop over every (sub-token, rank): the slow, obviously-correct sparse FFN."""
    rows = []
    for s in range(x.shape[0]):
        row = torch.zeros_like(x[s])
        for r in range(ids.shape[1]):
            if not drops[s, r]:
                e = int(ids[s, r])
                row = row + weights[s, r] * reference_expert(x[s], experts.w_in[e], experts.w_out[e],
                                                             experts.activation)
        rows.append(row)
    return torch.stack(rows)


def reference_moe_layer(layer, x):
    """Token by token, sub-token by sub-token, expert by expert; capacity by walking assignments in order."""
    cfg_m, k, n_routed = layer.n_subtokens, layer.top_k, layer.n_routed
    batch, seq, d_model = x.shape
    sub = x @ layer.head.weight.t() if layer.has_head_and_merge else x
    sub = sub.reshape(batch * seq, cfg_m, layer.d_sub)
    logits = reference_expert_logits(layer.router, sub, layer.gate.expert_load)
    chosen = logits.argsort(dim=-1, descending=True)[..., :k]
    weights = torch.softmax(logits.gather(-1, chosen), dim=-1)

    n_sub = batch * seq * cfg_m
    capacity = None if layer.capacity_factor is None else math.ceil(layer.capacity_factor * n_sub * k / n_routed)
    taken, rows = [0] * n_routed, []
    for t in range(batch * seq):
        for s in range(cfg_m):
            row = torch.zeros(layer.d_sub)
            for r in range(k):
                e = int(chosen[t, s, r])
                if capacity is not None and taken[e] >= capacity:
                    continue
                taken[e] += 1
                row = row + weights[t, s, r] * reference_expert(
                    sub[t, s], layer.experts.w_in[e], layer.experts.w_out[e], layer.experts.activation)
            row = row + shared_experts_one_by_one(layer, sub[t, s])
            rows.append(row)
    y = torch.stack(rows).reshape(batch, seq, d_model)
    return (y @ layer.merge.weight.t() if layer.has_head_and_merge else y), chosen


def reference_expert_logits(router, sub, expert_load):
    """Routing logits ``[tokens, subtokens, experts]`` from the router's weights, not its forward:
    Switch / MH-MoE's ``s = W_r x`` by einsum, GoH-MoE's graph router by :func:`einsum_expert_router`."""
    if isinstance(router, GraphExpertRouter):
        return einsum_expert_router(router, sub, expert_load)
    assert isinstance(router, LinearExpertRouter), type(router)
    return torch.einsum("nsd,ed->nse", sub.float(), router.proj.weight.float())


def shared_experts_one_by_one(layer, v):
    if layer.shared_experts is None:
        return torch.zeros_like(v)
    shared, h = layer.shared_experts, layer.experts.hidden
    n = shared.w_out.weight.shape[1] // h
    w_in, w_out = shared.w_in.weight.t(), shared.w_out.weight.t()  # [d, (2) n h], [n h, d]
    total = torch.zeros_like(v)
    for j in range(n):
        cols = slice(j * h, (j + 1) * h)
        if shared.activation == "swiglu":
            expert_in = torch.cat([w_in[:, cols], w_in[:, n * h + j * h:n * h + (j + 1) * h]], dim=1)
        else:
            expert_in = w_in[:, cols]
        total = total + reference_expert(v, expert_in, w_out[cols], shared.activation)
    return total


def stdlib_split_reference(max_bytes):
    """Independent re-reading of the documented rule: stdlib .py files ordered by sha1 of the
    relative path, capped, UTF-8 only, 5% of paths (by hash) go to validation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts)
             and not any(part.startswith(".") for part in p.relative_to(root).parts[:-1])]

    def key(path):
        return int.from_bytes(hashlib.sha1(path.relative_to(root).as_posix().encode()).digest()[:8], "big")

    files.sort(key=key)
    train, val, total = b"", b"", 0
    for path in files:
        if total >= max_bytes:
            break
        total += path.stat().st_size
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if key(path) % 100 < 5:
            val += raw + b"\n"
        else:
            train += raw + b"\n"
    return train, val


def moh_attention(x, qkv_weight, proj_weight, wg, wg_0, wg_1, num_heads, shared_head, routed_head):
    """SkyworkAI/MoH's ``Attention.forward`` (MoH-ViT), restated from its public code for the tests.

    Bidirectional attention of every head; routed logits ``x @ wg.T`` ([routed heads, d]); the
    full softmax, top-``routed_head`` selection, renormalised over the selection and scaled by
    ``routed_head``; shared gates ``softmax(x @ wg_1.T) * shared_head`` (ones for one shared head);
    stage weights ``2 softmax(x @ wg_0.T)``; ``l_aux = mean(me * ce) * E^2``.
    Returns ``(y [B, N, C], gates [B, N, H], l_aux)``.
    """
    batch, tokens, dim = x.shape
    head_dim = dim // num_heads
    qkv = (x @ qkv_weight.t()).reshape(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = torch.softmax((q @ k.transpose(-2, -1)) * head_dim ** -0.5, dim=-1)
    out = (attn @ v).transpose(1, 2)  # [B, N, H, head_dim]
    gates, l_aux = torch.ones(batch, tokens, num_heads), None
    if routed_head > 0:
        flat = x.reshape(batch * tokens, dim)
        probs = torch.softmax(flat @ wg.t(), dim=1)
        n_experts = probs.shape[1]
        _, indices = torch.topk(probs, k=routed_head, dim=1)
        mask = F.one_hot(indices, num_classes=n_experts).sum(dim=1)
        l_aux = torch.mean(probs.mean(dim=0) * mask.float().mean(dim=0)) * n_experts * n_experts
        routed = probs * mask
        routed = routed / routed.sum(dim=1, keepdim=True).clamp(min=torch.finfo(routed.dtype).eps)
        routed = routed.reshape(batch, tokens, -1) * routed_head
        if shared_head > 0:
            shared = torch.softmax(x @ wg_1.t(), dim=2) * shared_head if shared_head > 1 \
                else torch.ones(batch, tokens, 1)
            stage = torch.softmax(x @ wg_0.t(), dim=2) * 2
            gates = torch.cat([stage[..., :1] * shared, stage[..., 1:] * routed], dim=2)
        else:
            gates = routed
        out = torch.einsum("bne,bned->bned", gates, out)
    return out.reshape(batch, tokens, dim) @ proj_weight.t(), gates, l_aux


def moh_llama3_head_mask(q, n_shared, top_k):
    """MoH-LLaMA3's parameter-free head selection (docs/routing.md), restated for the tests.

    ``q [batch, seq, heads, head_dim]``: a head's score is its query's L2 norm over the std of the
    norms across heads; softmax; the top-``top_k`` routed heads (after the ``n_shared`` always-on
    ones) and the shared heads get mask 1, the rest 0. Returns ``[batch, seq, heads]``.
    """
    norms = torch.linalg.vector_norm(q, dim=-1)
    scores = torch.softmax(norms / norms.std(dim=-1, keepdim=True), dim=-1)
    mask = torch.zeros_like(scores)
    mask[..., :n_shared] = 1.0
    chosen = scores[..., n_shared:].topk(top_k, dim=-1).indices + n_shared
    return mask.scatter(-1, chosen, 1.0)


def einsum_expert_router(router, sub, expert_load=None):
    """GraphExpertRouter's math (docs/experts.md, GMoE's expert <-> expert step) written independently:
    dense adjacency matrices, einsum, masked softmax. ``sub [tokens, subtokens, d_sub]`` ->
    logits ``[tokens, subtokens, experts]`` with ``-inf`` off the bipartite graph."""
    n_sub, n_exp = router.n_subtokens, router.n_experts
    reaches = torch.zeros(n_exp, n_sub, dtype=torch.bool)  # [expert, slot]: slot -> expert is an edge
    for slot, expert in router.edge_index.t().tolist():
        reaches[expert, slot] = True
    peers = torch.eye(n_exp, dtype=torch.bool)  # [dst, src], self-loops included
    if router.among_experts is not None:
        for src, dst in router.among_experts[0].attention_edge_index.t().tolist():
            peers[dst, src] = True

    def gat(layer, x_src, x_dst, adjacency):  # adjacency [dst, src]
        h = torch.einsum("nsf,gf->nsg", x_src, layer.lin.weight)
        e = torch.einsum("ndf,f->nd", x_dst, layer.att_dst)[:, :, None] + torch.einsum("nsf,f->ns", h, layer.att_src)[:, None, :]
        e = F.leaky_relu(e, 0.2).masked_fill(~adjacency, float("-inf"))
        alpha = torch.softmax(e, dim=-1).nan_to_num(0.0)  # a destination without in-edges gets nothing
        return x_dst + F.gelu(torch.einsum("nds,nsf->ndf", alpha, h) + layer.bias)

    z_sub = torch.einsum("nsd,fd->nsf", sub, router.node_in.weight) + router.slot_embedding
    z_exp = router.expert_embedding
    if router.load_weight is not None and expert_load is not None:
        z_exp = z_exp + (expert_load - 1.0)[:, None] * router.load_weight
    z_exp = z_exp.expand(sub.shape[0], -1, -1)
    for r in range(len(router.to_experts)):
        z_exp = gat(router.to_experts[r], z_sub, z_exp, reaches)
        if router.among_experts is not None:
            z_exp = gat(router.among_experts[r], z_exp, z_exp, peers)
        z_sub = gat(router.to_subtokens[r], z_exp, z_sub, reaches.t())
    query = torch.einsum("nsf,gf->nsg", z_sub, router.query.weight) / math.sqrt(router.router_dim)
    logits = torch.einsum("nsf,nef->nse", query, z_exp) + router.expert_bias
    return logits.masked_fill(~reaches.t(), float("-inf"))
