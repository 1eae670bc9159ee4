"""Logit lens per head (gohgraph.analysis.logit_lens): W_U · W_O[h] · o_h, checked by hand."""

import math

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.analysis.logit_lens import (
    capture_head_outputs,
    collect_expert_logit_lens,
    collect_logit_lens,
    run_expert_logit_lens,
    run_logit_lens,
)


def tiny(**overrides):
    fields = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2,
                  router="graph", router_rounds=1, max_seq_len=32)
    fields.update(overrides)
    return GoHConfig(**fields)


def per_head_attention(x, qkv_weight, heads, theta=10000.0):
    """Causal RoPE attention per head, written from scratch: ``[batch, seq, heads, head_dim]``
    (tests/references.py's reference_mha without the output projection)."""
    batch, seq, d = x.shape
    hd = d // heads
    q, k, v = (x @ qkv_weight.t()).split([heads * hd] * 3, -1)
    q, k, v = (t.view(batch, seq, heads, hd).transpose(1, 2) for t in (q, k, v))
    angle = torch.outer(torch.arange(seq, dtype=torch.float32),
                        theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    cos, sin = angle.cos(), angle.sin()

    def rope(t):
        a, b = t[..., :hd // 2], t[..., hd // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    scores = (rope(q) @ rope(k).transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1), float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(1, 2)


@pytest.mark.parametrize("tied", [True, False])
def test_head_lens_equals_unembedding_times_output_projection_times_head_output(tied):
    torch.manual_seed(0)
    model = GoHTransformer(tiny(inter_head_flow=False, tie_embeddings=tied)).eval()
    ids = torch.randint(0, 64, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding: never counted
    lens = run_logit_lens(model, [(ids, mask)])

    with torch.no_grad():
        out = model(ids)  # the gates of the real tokens; padding is not used below
        attn = model.blocks[0].attn
        x = model.blocks[0].attn_norm(model.embed(ids))
        heads_out = per_head_attention(x[1:], attn.qkv.weight, 4)  # rows without padding
        gates = out.routing[0].head_gates[1:]
        tail = per_head_attention(x[:1, 4:], attn.qkv.weight, 4)  # row 0 from its first real token
        tail_gates = model(ids[:1], attention_mask=mask[:1]).routing[0].head_gates[:, 4:]
        applied = torch.cat([(heads_out * gates[..., None]).reshape(-1, 4, 8),
                             (tail * tail_gates[..., None]).reshape(-1, 4, 8)])
        active = torch.cat([gates.reshape(-1, 4), tail_gates.reshape(-1, 4)]) != 0
        w_u = model.embed.weight if tied else model.lm_head.weight
        for h in range(4):
            o_h = applied[active[:, h], h].double().mean(0)  # mean over the tokens where h is active
            by_hand = w_u.double() @ attn.out.weight[:, h * 8:(h + 1) * 8].double() @ o_h
            # a head never active has no lens (NaN on both sides)
            torch.testing.assert_close(lens.scores(0)[h], by_hand, rtol=1e-4, atol=1e-6, equal_nan=True)
    assert lens.counts[0, 0] == 3 * 12 - 4  # the shared head: every real token
    assert (lens.counts[0] > 0).sum() >= 3  # the shared head and routed ones were checked


def test_heads_sum_to_the_attention_output_with_inter_head_flow():
    """With flow the captured outputs are the mixed ones: the heads' contributions add up to the
    attention output (less its bias)."""
    torch.manual_seed(1)
    model = GoHTransformer(tiny(inter_head_flow=True, linear_bias=True)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.head_routing.flow_scale.fill_(0.7)  # starts at 0: make the flow matter
            torch.nn.init.normal_(block.attn.out.bias)
    ids = torch.randint(0, 64, (2, 10))
    outputs = []
    hooks = [block.attn.register_forward_hook(lambda m, i, o: outputs.append(o[0])) for block in model.blocks]
    try:
        with torch.no_grad(), capture_head_outputs(model) as captured:
            model(ids)
            heads = list(captured)
    finally:
        for hook in hooks:
            hook.remove()
    for layer, block in enumerate(model.blocks):
        w_o = block.attn.out.weight.view(32, 4, 8)
        contributions = torch.einsum("mhd,bshd->bshm", w_o, heads[layer])
        torch.testing.assert_close(contributions.sum(2) + block.attn.out.bias, outputs[layer],
                                   rtol=1e-5, atol=1e-6)


def test_report_lists_top_tokens_per_layer_and_head():
    torch.manual_seed(2)
    model = GoHTransformer(tiny())
    batches = [torch.randint(0, 64, (2, 16)) for _ in range(2)]

    class Letters:
        def decode(self, ids):
            return "".join(chr(65 + i % 26) for i in ids)

    report = collect_logit_lens(model, batches, top_k=5, tokenizer=Letters())
    assert sorted(report) == ["0", "1"] and all(sorted(layer) == ["0", "1", "2", "3"] for layer in report.values())
    lens = run_logit_lens(model, batches)
    for layer, heads in report.items():
        for head, rows in heads.items():
            if lens.counts[int(layer), int(head)] == 0:  # never active: no tokens to promote
                assert rows == []
                continue
            assert len(rows) == 5 and all(len(row) == 3 for row in rows)
            scores = [row[1] for row in rows]
            assert scores == sorted(scores, reverse=True)
            assert [row[0] for row in rows] == lens.scores(int(layer))[int(head)].topk(5).indices.tolist()
            assert rows[0][2] == chr(65 + rows[0][0] % 26)
    assert model.training  # the mode is restored


def test_refuses_models_outside_its_scope():
    with pytest.raises(ValueError, match="logit lens"):
        run_logit_lens(GoHTransformer(tiny(recursion="mor", max_recursions=2)), [])


# ---------------------------------------------------------------------- experts
def expert_tiny(ffn):
    return tiny(ffn=ffn, n_experts=5, n_shared_experts=1, top_k_experts=2, n_subtokens=2 if ffn == "mh-moe" else 1)


@pytest.mark.parametrize("ffn", ["mh-moe", "moe"])
def test_expert_lens_equals_unembedding_times_merge_times_gated_expert_output(ffn):
    """ell_e = W_U mean_{t in T_e} W_merge [1[e chosen by slot s] w_{t,s,e} E_e(x_{t,s})]_s, by hand."""
    torch.manual_seed(3)
    cfg = expert_tiny(ffn)
    model = GoHTransformer(cfg).eval()
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding: its sub-tokens are routed for the record but never counted
    inputs = {}
    hooks = [block.ffn.register_forward_pre_hook(lambda mod, args, layer=i: inputs.__setitem__(layer, args[0]))
             for i, block in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            routing = model(ids, attention_mask=mask).routing
    finally:
        for hook in hooks:
            hook.remove()
    lens = run_expert_logit_lens(model, [(ids, mask)])

    m, d_sub = cfg.n_subtokens, 32 // cfg.n_subtokens
    w_u = model.embed.weight.double()
    for layer, block in enumerate(model.blocks):
        ffn_module = block.ffn
        x = inputs[layer].double()
        sub = x @ ffn_module.head.weight.double().t() if ffn == "mh-moe" else x
        per_token = {}  # (expert, token) -> contribution [d_model] before the merge
        for b in range(2):
            for t in range(9):
                if not mask[b, t]:
                    continue
                for s in range(m):
                    piece = sub[b, t, s * d_sub:(s + 1) * d_sub]
                    for j in range(2):
                        e = int(routing[layer].expert_indices[b, t, s, j])
                        w = float(routing[layer].expert_weights[b, t, s, j])
                        gate, up = (piece @ ffn_module.experts.w_in[e].double()).chunk(2)
                        out = (torch.nn.functional.silu(gate) * up) @ ffn_module.experts.w_out[e].double()
                        placed = per_token.setdefault((e, b, t), torch.zeros(32, dtype=torch.float64))
                        placed[s * d_sub:(s + 1) * d_sub] += w * out
        for e in range(4):
            tokens = [c for (expert, *_), c in per_token.items() if expert == e]
            assert lens.counts[layer, e] == len(tokens)
            if not tokens:
                assert torch.isnan(lens.scores(layer)[e]).all()
                continue
            mean = torch.stack(tokens).mean(0)
            if ffn == "mh-moe":
                mean = ffn_module.merge.weight.double() @ mean
            torch.testing.assert_close(lens.scores(layer)[e], w_u @ mean, rtol=1e-4, atol=1e-6)
    assert lens.counts.sum() >= 2 * 15  # every real token reached some expert in each layer


def test_expert_lens_report_and_scope():
    torch.manual_seed(4)
    model = GoHTransformer(expert_tiny("mh-moe"))
    batches = [torch.randint(0, 64, (2, 12))]
    report = collect_expert_logit_lens(model, batches, top_k=3)
    lens = run_expert_logit_lens(model, batches)
    assert sorted(report) == ["0", "1"] and all(sorted(layer) == ["0", "1", "2", "3"] for layer in report.values())
    for layer, experts in report.items():
        for expert, rows in experts.items():
            if lens.counts[int(layer), int(expert)] == 0:
                assert rows == []
            else:
                assert [row[0] for row in rows] == lens.scores(int(layer))[int(expert)].topk(3).indices.tolist()
    assert model.training
    with pytest.raises(ValueError, match="expert logit lens"):
        run_expert_logit_lens(GoHTransformer(tiny()), batches)  # a dense feed-forward: no experts
