"""MoSA (Piękos, Csordás, Schmidhuber 2025) as a configuration: the sparse heads equal a port of the
released PureMoSA (piotrpiekos/MoSA) in outputs and gradients; their attention FLOPs fall as
(k/T)^2; causality of the training rule given its choice, and of the per-token decode rule;
cached decoding equals recompute; padding; the routing record; the combinations refused."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.analysis.flops import count_flops
from gohgraph.layers.mosa import MOSA_AUX, MixtureOfSparseAttention, mosa_tokens_per_head
from gohgraph.layers.positions import build_query_key_positions
from tests.helpers import assert_later_tokens_change_no_earlier_logit

TINY = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
MOSA = dict(n_mosa_heads=4, mosa_sparsity=4)


# ---------------------------------------------------------------------- the released module, ported
class ReleasedRotary(nn.Module):
    """MoSARotaryPosEncoding: rotate-half RoPE over the first ``n_rotate`` dims, angles gathered
    at each kept token's original index."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))

    @staticmethod
    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=x1.ndim - 1)

    def apply_rot(self, x, index, sin, cos):
        index = index.unsqueeze(-1).expand(*x.shape)
        shape = (x.shape[0], x.shape[1], sin.shape[-2], sin.shape[-1])
        sin_gathered = torch.gather(sin.expand(shape), dim=-2, index=index)
        cos_gathered = torch.gather(cos.expand(shape), dim=-2, index=index)
        return x * cos_gathered + self.rotate_half(x) * sin_gathered

    def forward(self, q, q_index, k, k_index):
        t = torch.arange(int(q_index.max()) + 1).type_as(self.inv_freq)
        emb = torch.einsum("i,j->ij", t, self.inv_freq)
        emb = torch.cat((emb, emb), dim=-1)
        sin, cos = emb.sin().view(1, 1, *emb.shape), emb.cos().view(1, 1, *emb.shape)
        return self.apply_rot(q, q_index, sin, cos), self.apply_rot(k, k_index, sin, cos)


class ReleasedPureMoSA(nn.Module):
    """PureMoSA (mosa/MoSA.py) with ExpertGather / ExpertScatter (the einsum + scatter_add one, the
    class the file defines last), written out: sigmoid router, top-k over the sequence (first token
    forced with include_first), per-head QKV of the gathered tokens, RoPE at their indices, SDPA
    under the mask I_q >= I_k, output times the router score, scatter-add back."""

    def __init__(self, n_heads, sparsity, h, h_prim, include_first=0, rotate_fraction=1.0):
        super().__init__()
        self.n_heads, self.sparsity, self.h_prim, self.include_first = n_heads, sparsity, h_prim, include_first
        self.r = nn.Sequential(nn.Linear(h, n_heads, bias=False), nn.Sigmoid())
        self.qkv_w = nn.Parameter(torch.empty(n_heads, h, 3 * h_prim))
        self.o_w = nn.Parameter(torch.empty(n_heads, h_prim, h))
        self.n_rotate = int(rotate_fraction * h_prim)
        self.n_rotate -= self.n_rotate % 2
        self.pe = ReleasedRotary(self.n_rotate)

    def get_topk(self, x):
        B, T, _ = x.shape
        logits = self.r(x)
        k = min(max(int(T // self.sparsity), 2), T)
        if self.include_first:
            tail_vals, tail_idx = torch.topk(logits[:, 1:, :], k=k - 1, dim=1)
            vals = torch.cat([logits[:, :1, :], tail_vals], dim=1)
            idxs = torch.cat([torch.zeros(B, 1, self.n_heads, dtype=torch.long), tail_idx + 1], dim=1)
            return vals.transpose(1, 2), idxs.transpose(1, 2), k
        top = logits.topk(dim=1, k=k)
        return top.values.transpose(1, 2), top.indices.transpose(1, 2), k

    def forward(self, X):
        B, T, h = X.shape
        topk_vals, topk_I, k = self.get_topk(X)
        index = topk_I.reshape(B, self.n_heads * k)[..., None].expand(-1, -1, h)
        gathered = torch.gather(X, dim=1, index=index).reshape(B, self.n_heads, k, h)
        Q, K, V = torch.einsum("beki,eij->bekj", gathered, self.qkv_w).chunk(3, dim=-1)
        M = topk_I.unsqueeze(-1) >= topk_I.unsqueeze(-2)
        if self.n_rotate < self.h_prim:
            r_q, r_k = self.pe(Q[..., :self.n_rotate], topk_I, K[..., :self.n_rotate], topk_I)
            Q = torch.cat([r_q, Q[..., self.n_rotate:]], dim=-1)
            K = torch.cat([r_k, K[..., self.n_rotate:]], dim=-1)
        else:
            Q, K = self.pe(Q, topk_I, K, topk_I)
        AV = F.scaled_dot_product_attention(Q.unsqueeze(2), K.unsqueeze(2), V.unsqueeze(2),
                                            attn_mask=M.bool().unsqueeze(2)).squeeze(2)
        AV = AV * topk_vals.unsqueeze(-1)
        rows = torch.einsum("bekj,eji->beki", AV, self.o_w)
        out = torch.zeros(B, T, rows.shape[-1], dtype=rows.dtype)
        out.scatter_add_(1, topk_I[..., None].expand(-1, -1, -1, h).reshape(B, -1, h), rows.reshape(B, -1, h))
        return out


def sparse_heads(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    cfg = GoHConfig(**{**TINY, **MOSA, **overrides})
    module = MixtureOfSparseAttention(cfg, 0).to(dtype).train()
    rotary = build_query_key_positions(cfg)
    return cfg, module, rotary


def released_with_the_same_weights(cfg, module, dtype):
    port = ReleasedPureMoSA(cfg.n_mosa_heads, cfg.mosa_sparsity, cfg.d_model, cfg.head_dim,
                            include_first=int(cfg.mosa_include_first)).to(dtype)
    with torch.no_grad():
        port.r[0].weight.copy_(module.router)
        port.qkv_w.copy_(module.qkv)
        port.o_w.copy_(module.out)
    return port


# float64 to 1e-6 only: the router's scores are computed in float32 whatever the input (the released
# module computes them in the input's dtype), so the output weights agree to float32's precision
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-6)])
@pytest.mark.parametrize("overrides", [dict(), dict(mosa_include_first=True),
                                       dict(n_mosa_heads=3, mosa_sparsity=3, n_heads=2)],
                         ids=["H4rho4", "include-first", "H3rho3"])
def test_sparse_heads_equal_the_released_pure_mosa_outputs_and_gradients(overrides, dtype, tol):
    cfg, module, rotary = sparse_heads(dtype, **overrides)
    port = released_with_the_same_weights(cfg, module, dtype)
    x = torch.randn(2, 19, cfg.d_model, dtype=dtype, generator=torch.Generator().manual_seed(3))
    x_ours, x_port = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, record = module(x_ours, rotary)
    want = port(x_port)
    torch.testing.assert_close(y, want, rtol=tol, atol=tol)
    y.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(x_ours.grad, x_port.grad, rtol=tol, atol=tol)
    for ours, theirs in ((module.router, port.r[0].weight), (module.qkv, port.qkv_w), (module.out, port.o_w)):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=tol, atol=tol)
    k = mosa_tokens_per_head(19, cfg.mosa_sparsity)
    assert torch.all(record.selected.sum(1) == k)  # [batch, heads]: k tokens each
    assert MOSA_AUX in record.aux_losses and record.aux_losses[MOSA_AUX].requires_grad


def test_only_the_kept_tokens_are_projected(monkeypatch):
    cfg, module, rotary = sparse_heads(n_mosa_heads=2, mosa_sparsity=8)
    seen = []
    real = torch.einsum

    def spy(equation, *operands):
        seen.append((equation, operands[0].shape))
        return real(equation, *operands)

    monkeypatch.setattr(torch, "einsum", spy)
    module(torch.randn(1, 64, cfg.d_model), rotary)
    assert seen[0] == ("bhkd,hdf->bhkf", (1, 2, 8, cfg.d_model))  # 64 / 8 tokens per head, not 64


# ---------------------------------------------------------------------- FLOPs fall as (k / T)^2
def attention_flops(sparsity: int, seq: int = 512) -> int:
    cfg, module, rotary = sparse_heads(n_mosa_heads=2, mosa_sparsity=sparsity, max_seq_len=seq)
    x = torch.randn(1, seq, cfg.d_model, generator=torch.Generator().manual_seed(0))
    _, per_op = count_flops(lambda: module(x, rotary)[0].sum().backward())
    return sum(n for op, n in per_op.items() if "scaled_dot_product" in op)


def test_attention_flops_fall_as_the_square_of_the_kept_share():
    seq = 512
    full = attention_flops(1, seq)  # k = T: the dense causal attention of the same heads
    assert full > 0  # the fused CPU kernel is counted (gohgraph.analysis.flops), not 0
    for sparsity in (2, 4, 8, 16):
        k = seq // sparsity
        ratio = attention_flops(sparsity, seq) / full
        # the causal kernel computes k (k + 1) / 2 of the pairs: (k / T)^2 up to the diagonal
        assert ratio == pytest.approx(k * (k + 1) / (seq * (seq + 1)), rel=1e-9)
        assert ratio == pytest.approx((k / seq) ** 2, rel=1.5 / k)


# ---------------------------------------------------------------------- causality
def mosa_model(**overrides) -> GoHTransformer:
    torch.manual_seed(0)
    return GoHTransformer(GoHConfig(**{**TINY, **MOSA, **overrides}))


ROUTED = dict(router="linear", n_shared_heads=1, top_k_heads=2)


THRESHOLD = dict(mosa_inference="score-threshold")


@pytest.mark.parametrize("overrides", [dict(), dict(mosa_include_first=True), ROUTED,
                                       dict(position_embedding="learned"), THRESHOLD],
                         ids=["MoSA", "include-first", "MoH+MoSA", "learned-positions", "score-threshold"])
def test_the_decode_rule_never_lets_later_tokens_change_earlier_outputs(overrides):
    model = mosa_model(**overrides).eval()  # a fresh inference router keeps about half the tokens
    assert_later_tokens_change_no_earlier_logit(model, vocab_size=32, seq=20, split=9)


def test_the_training_rule_is_causal_given_its_choice():
    """Expert choice with a fixed choice: a later change the routers cannot see (orthogonal to every
    router row) changes no earlier output, and does change later ones."""
    cfg, module, rotary = sparse_heads()
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 24, cfg.d_model, generator=generator)
    change = torch.randn(2, 24, cfg.d_model, generator=generator)
    change[:, :13] = 0
    basis = torch.linalg.qr(module.router.detach().T).Q  # [d_model, heads]
    change = change - change @ basis @ basis.T  # invisible to the routers
    with torch.no_grad():
        before, chosen_before = module(x, rotary)
        after, chosen_after = module(x + change, rotary)
    assert torch.equal(chosen_before.selected, chosen_after.selected)
    torch.testing.assert_close(after[:, :13], before[:, :13], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 13:], before[:, 13:])


def test_the_training_rule_reads_the_future_which_is_why_decoding_has_its_own_rule():
    """A later token with a high router score pushes an earlier one out of the top-k: the earlier
    output changes. This is the leak the per-token decode rule removes (docs/decoding.md)."""
    cfg, module, rotary = sparse_heads(n_mosa_heads=1, mosa_sparsity=4)
    x = torch.randn(1, 16, cfg.d_model, generator=torch.Generator().manual_seed(5))
    direction = module.router[0].detach() / module.router[0].detach().norm()
    quiet, loud = x.clone(), x.clone()
    quiet[0, 15], loud[0, 15] = -50 * direction, 50 * direction  # the lowest, then the highest score
    with torch.no_grad():
        before, chosen_before = module(quiet, rotary)
        after, chosen_after = module(loud, rotary)
    assert chosen_before.selected[0, :15, 0].sum() == 4 and chosen_after.selected[0, :15, 0].sum() == 3
    assert not torch.allclose(after[0, :15], before[0, :15])


@pytest.mark.parametrize("overrides", [dict(), dict(mosa_include_first=True), ROUTED, THRESHOLD],
                         ids=["MoSA", "include-first", "MoH+MoSA", "score-threshold"])
def test_cached_decoding_equals_recompute(overrides):
    model = mosa_model(**overrides).eval()
    ids = torch.randint(0, 32, (2, 14), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache("static", 14)
        steps = [model(ids[:, :5], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(5, 14)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    prompt = ids[:, :5]
    cached = model.generate(prompt, max_new_tokens=8, temperature=0.0, use_cache=True)
    recomputed = model.generate(prompt, max_new_tokens=8, temperature=0.0, use_cache=False)
    assert torch.equal(cached, recomputed)


def masked_rule_reference(module, x, rotary, kept, positions):
    """The per-token rule spelled out over every token: each head projects all of them and attends
    to the kept keys at or before each query; outputs weighted by score x kept."""
    batch, seq, _ = x.shape
    scores = torch.sigmoid(F.linear(x.float(), module.router.float()))
    q, key, value = torch.einsum("btd,hdf->bhtf", x, module.qkv).chunk(3, dim=-1)
    q, key = module._rotate(rotary, q, key, positions[:, None, :].expand(-1, module.n_heads, -1))
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    allowed = (causal & kept.transpose(1, 2)[:, :, None, :]) | torch.eye(seq, dtype=torch.bool)
    attn = F.scaled_dot_product_attention(q, key, value, attn_mask=allowed)
    gate = (scores * kept).transpose(1, 2)[..., None]
    return torch.einsum("bhtf,hfd->btd", attn * gate, module.out)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("overrides", [dict(), THRESHOLD, dict(mosa_include_first=True)],
                         ids=["aux-router", "score-threshold", "include-first"])
def test_evaluation_attends_only_the_kept_tokens_and_equals_the_masked_rule(padded, overrides, monkeypatch):
    """Without a cache the rule's output is computed on the kept tokens only (gathered, padded to the
    most any head keeps): equal to the masked computation in outputs and gradients, and only
    kept tokens reach the projections."""
    cfg, module, rotary = sparse_heads(**overrides)
    module.eval()
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 21, cfg.d_model, generator=generator, requires_grad=True)
    token_mask = positions = None
    if padded:
        token_mask = torch.ones(2, 21, dtype=torch.bool)
        token_mask[1, :6] = False
        positions = (token_mask.long().cumsum(-1) - 1).clamp(min=0)
    y, record = module(x, rotary, positions=positions, token_mask=token_mask)
    kept = record.selected
    assert 0 < int(kept.sum()) < kept.numel()  # the rule keeps some tokens and drops others
    want = masked_rule_reference(module, x, rotary, kept,
                                 torch.arange(21).expand(2, 21) if positions is None else positions)
    if padded:  # a padded token's output is never read
        want = want * token_mask[..., None]
        y = y * token_mask[..., None]
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    params = (x, module.router, module.qkv, module.out)
    for got, expected in zip(torch.autograd.grad(y.square().sum(), params, allow_unused=True),
                             torch.autograd.grad(want.square().sum(), params)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    seen, real = [], torch.einsum
    monkeypatch.setattr(torch, "einsum", lambda equation, *ops: seen.append(ops[0].shape) or real(equation, *ops))
    with torch.no_grad():
        module(x, rotary, positions=positions, token_mask=token_mask)
    most = int(kept.sum(1).max())  # [batch, heads] -> the most any head of any row keeps
    assert seen[0] == (2, cfg.n_mosa_heads, most, cfg.d_model) and most < 21


def test_a_decode_step_projects_and_attends_only_the_heads_that_keep_its_token():
    """A decode step's FLOPs: the router, then for each head that keeps the token its projections,
    its attention over the kept keys and its output; a head that drops it costs nothing more."""
    model = mosa_model(mosa_inference="score-threshold").eval()
    sparse = model.blocks[0].attn.sparse_heads
    cfg = model.config
    ids = torch.randint(0, 32, (1, 9), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache("static", 12)
    x = torch.randn(1, 1, cfg.d_model)
    with torch.no_grad():
        model(ids, cache=cache)
        flops = {}
        for keeping in (0, 1, 4):  # heads whose threshold the new token clears
            sparse.score_threshold.fill_(2.0)  # above every sigmoid score: nothing kept
            sparse.score_threshold[:keeping] = -1.0
            cache.lengths = [9] * len(cache.lengths)
            flops[keeping] = count_flops(lambda: sparse(x, model.blocks[0].attn.rotary, cache=cache))[0]
    router = 2 * cfg.d_model * cfg.n_mosa_heads
    assert flops[0] == router
    per_head = (flops[4] - router) / 4
    assert flops[1] == router + per_head and per_head >= 2 * cfg.d_model * 3 * cfg.head_dim


def test_bf16_autocast_trains_and_decodes():
    """Under autocast the projections give bf16 rows while the residual stream stays float32: the
    training step runs and reaches the sparse heads' weights, and cached decoding keeps the
    recomputed tokens (the gathered prompt writes bf16 keys into the cache, as later steps do)."""
    model = mosa_model().train()
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    sparse = model.blocks[0].attn.sparse_heads
    assert torch.isfinite(loss) and sparse.qkv.grad.abs().sum() > 0 and sparse.out.grad.abs().sum() > 0
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for cache in ("dynamic", "static"):
            cached = model.generate(ids[:, :6], max_new_tokens=6, temperature=0.0, cache=cache)
            assert torch.equal(cached, model.generate(ids[:, :6], max_new_tokens=6, temperature=0.0, use_cache=False))


def test_left_padded_generation_equals_each_row_alone():
    model = mosa_model().eval()
    long = torch.randint(0, 32, (1, 7), generator=torch.Generator().manual_seed(8))
    short = torch.randint(0, 32, (1, 4), generator=torch.Generator().manual_seed(9))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)])
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    together = model.generate(batch, max_new_tokens=5, temperature=0.0, attention_mask=mask)
    assert torch.equal(together[:1, 7:], model.generate(long, max_new_tokens=5, temperature=0.0)[:, 7:])
    assert torch.equal(together[1:, 7:], model.generate(short, max_new_tokens=5, temperature=0.0)[:, 4:])


def test_a_padded_row_chooses_in_training_as_it_does_alone():
    model = mosa_model(mosa_include_first=True).train()
    ids = torch.randint(0, 32, (1, 16), generator=torch.Generator().manual_seed(10))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 16, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone, together = model(ids), model(padded, attention_mask=mask)
    torch.testing.assert_close(together.logits[:, 5:], alone.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(alone.routing, together.routing):
        assert torch.equal(b.sparse_heads.selected[:, 5:], a.sparse_heads.selected)
        assert not b.sparse_heads.selected[:, :5].any()  # padding is never kept


def test_score_threshold_follows_the_kth_score_of_training_steps_only():
    from gohgraph.layers.mosa import THRESHOLD_MOMENTUM

    cfg, module, rotary = sparse_heads(mosa_include_first=True, **THRESHOLD)
    x = torch.randn(3, 20, cfg.d_model, generator=torch.Generator().manual_seed(11))
    scores = torch.sigmoid(x @ module.router.detach().T)  # [batch, seq, heads]
    k = mosa_tokens_per_head(20, cfg.mosa_sparsity)
    # the forced first token does not count: the k-th score is the (k - 1)-th of the others
    kth = scores[:, 1:].topk(k - 1, dim=1).values[:, -1].mean(0)
    with torch.no_grad():  # a look at the training rule trains nothing
        module(x, rotary)
    assert torch.equal(module.score_threshold, torch.full((4,), 0.5))
    module(x, rotary)
    torch.testing.assert_close(module.score_threshold, 0.5 + THRESHOLD_MOMENTUM * (kth - 0.5))
    module.eval()
    with torch.no_grad():
        _, record = module(x, rotary)
    assert torch.equal(record.selected, (scores >= module.score_threshold) | (torch.arange(20) == 0)[None, :, None])


# ---------------------------------------------------------------------- record, losses, refusals
def test_routing_record_and_the_inference_routers_loss():
    model = mosa_model(mosa_aux_loss_coef=0.5).train()
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(7))
    out = model(ids, labels=ids)
    for record in out.routing:
        selection = record.sparse_heads
        assert selection.selected.shape == (2, 16, 4) and torch.all(selection.selected.sum(1) == 4)
        assert torch.all((selection.scores > 0) & (selection.scores < 1))
        bce = record.aux_losses[MOSA_AUX]
        assert bce.item() == pytest.approx(math.log(2), abs=0.05)  # a fresh inference router: logits near 0
    total = sum(0.5 * r.aux_losses[MOSA_AUX] for r in out.routing)
    torch.testing.assert_close(out.aux_loss, total)
    out.aux_loss.backward()  # the BCE trains only the inference routers (they read a detached x)
    attn = model.blocks[0].attn.sparse_heads
    assert attn.inference_router.weight.grad is not None and attn.router.grad is None
    assert model.embed.weight.grad is None


def test_a_saved_mosa_model_loads_with_its_decode_rule(tmp_path):
    from gohgraph import from_pretrained

    model = mosa_model(**THRESHOLD).train()
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(12))
    model(ids, labels=ids).loss.backward()  # moves the score thresholds away from their start
    model.save_pretrained(tmp_path / "mosa")
    loaded = from_pretrained(tmp_path / "mosa").eval()
    assert loaded.config.mosa_inference == "score-threshold"
    assert torch.equal(loaded.blocks[0].attn.sparse_heads.score_threshold,
                       model.blocks[0].attn.sparse_heads.score_threshold)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


def test_checkpoints_without_sparse_heads_keep_their_parameters():
    plain = dict(GoHTransformer(GoHConfig(**TINY)).named_parameters())
    assert not any("sparse_heads" in name for name in plain)
    mosa = dict(mosa_model().named_parameters())
    assert set(plain) <= set(mosa)
    assert mosa["blocks.0.attn.sparse_heads.qkv"].shape == (4, 32, 3 * 8)


@pytest.mark.parametrize("overrides, field", [
    (dict(n_mosa_heads=-1), "n_mosa_heads"),
    (dict(mosa_sparsity=0), "mosa_sparsity"),
    (dict(mosa_aux_loss_coef=-0.1), "mosa_aux_loss_coef"),
    (dict(attention="mla"), "attention"),
    (dict(linear="bitnet"), "linear"),
    (dict(n_attention_experts=4), "n_attention_experts"),
    (dict(recursion="mor"), "recursion"),
    (dict(sliding_window=8), "sliding_window"),
    (dict(position_embedding="alibi"), "position_embedding"),
    (dict(model_type="encoder"), "model_type"),
    (dict(mosa_include_first="maybe"), "mosa_include_first"),
    (dict(n_mosa_heads=2.5), "n_mosa_heads"),
    (dict(mosa_inference="psychic"), "mosa_inference"),
])
def test_combinations_it_cannot_do_are_refused(overrides, field):
    with pytest.raises(ValueError, match=field):
        GoHConfig(**{**TINY, **MOSA, **overrides})


def test_tensor_parallel_and_the_compiled_step_refuse_sparse_heads():
    from gohgraph.models.compiled_decode import whole_step_unsupported
    from gohgraph.parallel.tensor_parallel import check_tensor_parallel_layout

    with pytest.raises(ValueError, match=r"^tensor_parallel=2 does not shard n_mosa_heads"):
        check_tensor_parallel_layout(mosa_model(), 2)
    assert "MoSA" in whole_step_unsupported(mosa_model().config)


def test_mosa_row_of_the_comparison():
    from gohgraph.experiments.variants import MOSA, SETTINGS, comparison_variants, match_parameters, reference_of

    variants = comparison_variants(**SETTINGS["quick"][0], names=["dense", MOSA])
    row = variants[MOSA]
    assert row.n_mosa_heads >= 1 and row.router == "dense" and row.ffn == "dense"
    assert "MoSA" in reference_of(row) and "piotrpiekos/MoSA" in reference_of(row)
    assert "MoSA" not in reference_of(variants["dense"])
    matched = match_parameters(variants)[MOSA]
    assert abs(matched.mismatch) <= 0.02 and matched.heads_active == "8/8 + 8 sparse (T/8)"
