"""GoHSeq2Seq: a causal decoder, invisible source padding, cached generation == recomputation,
cross-attention keys/values projected once per generate, dense cross-attention == a plain one
written here, every router x FFN trains, checkpoints, and the checks on bad values."""

import math

import pytest
import torch
import torch.nn.functional as F

import gohgraph
from gohgraph import GoHConfig, GoHSeq2Seq
from gohgraph.config import FFN_KINDS, ROUTERS
from gohgraph.layers.attention import GoHAttention

VOCAB = 48


def seq2seq_config(router="graph", **overrides):
    values = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_decoder_layers=2, n_heads=4, router=router,
                  router_rounds=2, router_dim=8, max_seq_len=32, model_type="seq2seq",
                  position_embedding="t5-relative", attention_scale="none", n_experts=4, top_k_experts=2)
    if router != "dense":
        values.update(n_shared_heads=1, top_k_heads=2)
    values.update(overrides)
    if values.get("ffn") in ("mh-moe", "graph-moe"):
        values["n_subtokens"] = 2
    return GoHConfig(**values)


def seq2seq(router="graph", seed=0, **overrides):
    torch.manual_seed(seed)
    model = GoHSeq2Seq(seq2seq_config(router, **overrides)).eval()
    for module in model.modules():  # give inter-head flow a weight so the tests exercise it
        if hasattr(module, "flow_scale") and module.flow_scale is not None:
            with torch.no_grad():
                module.flow_scale.normal_()
    return model


def padded_source(batch=3, seq=9, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, 6:] = 0
    if batch > 2:
        mask[2, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("norm_position,position_embedding", [("pre", "t5-relative"), ("post", "sinusoidal"),
                                                              ("pre", "rope")])
def test_decoder_is_causal(router, norm_position, position_embedding):
    model = seq2seq(router, norm_position=norm_position, position_embedding=position_embedding)
    source, mask = padded_source()
    target = torch.randint(0, VOCAB, (3, 8))
    changed = target.clone()
    changed[:, 5] = (target[:, 5] + 1) % VOCAB
    before = model(source, mask, decoder_input_ids=target).logits
    after = model(source, mask, decoder_input_ids=changed).logits
    torch.testing.assert_close(after[:, :5], before[:, :5], rtol=0, atol=1e-6)
    assert (after[:, 5] - before[:, 5]).abs().amax(-1).min() > 1e-6  # the changed position itself moved


@pytest.mark.parametrize("router", ROUTERS)
def test_changing_padded_source_changes_no_decoder_output(router):
    model = seq2seq(router, ffn="moe")
    source, mask = padded_source()
    changed = source.clone()
    changed[0, 6:] = (source[0, 6:] + 7) % VOCAB
    changed[2, 3:] = (source[2, 3:] + 5) % VOCAB
    target = torch.randint(0, VOCAB, (3, 6))
    before = model(source, mask, decoder_input_ids=target)
    after = model(changed, mask, decoder_input_ids=target)
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=1e-6)
    real = mask.bool()
    torch.testing.assert_close(after.encoder_hidden[real], before.encoder_hidden[real], rtol=0, atol=1e-6)
    # a real source token is seen: changing one changes the decoder output
    changed[1, 0] = (source[1, 0] + 1) % VOCAB
    assert not torch.allclose(model(changed, mask, decoder_input_ids=target).logits[1], before.logits[1])


@pytest.mark.parametrize("router", ["dense", "graph"])
def test_decoder_padding_is_invisible_to_other_target_tokens(router):
    model = seq2seq(router)
    source, mask = padded_source()
    target = torch.randint(0, VOCAB, (3, 6))
    target_mask = torch.ones(3, 6, dtype=torch.long)
    target_mask[:, 2] = 0
    changed = target.clone()
    changed[:, 2] = (target[:, 2] + 1) % VOCAB
    before = model(source, mask, decoder_input_ids=target, decoder_attention_mask=target_mask).logits
    after = model(source, mask, decoder_input_ids=changed, decoder_attention_mask=target_mask).logits
    keep = torch.tensor([0, 1, 3, 4, 5])
    torch.testing.assert_close(after[:, keep], before[:, keep], rtol=0, atol=1e-6)
    unmasked = model(source, mask, decoder_input_ids=changed).logits
    assert not torch.allclose(unmasked[:, 3:], before[:, 3:])  # without the mask the token is read


def recomputed_greedy(model, source, mask, steps):
    """Greedy decoding that reruns the whole model on the whole prefix at every step (no cache,
    no memory reuse)."""
    ids = torch.full((source.shape[0], 1), model.config.decoder_start_token_id)
    for _ in range(steps):
        logits = model(source, mask, decoder_input_ids=ids).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("router,position_embedding,ffn,extra", [
    ("dense", "t5-relative", "dense", {}), ("linear", "t5-relative", "moe", {}),
    ("graph", "t5-relative", "graph-moe", {}), ("graph", "rope", "dense", {}),
    ("graph", "learned", "mh-moe", {}), ("query-norm", "sinusoidal", "dense", {}),
    ("graph", "t5-relative", "dense", dict(sliding_window=3, n_kv_heads=2, norm_position="post"))])
def test_cached_generation_equals_full_recompute(router, position_embedding, ffn, extra):
    # a wide init: with 0.02 a tied tiny model only echoes the token it reads
    model = seq2seq(router, position_embedding=position_embedding, ffn=ffn, init_std=0.3, **extra)
    source, mask = padded_source()
    generated = model.generate(source, max_new_tokens=7, attention_mask=mask, temperature=0.0)
    assert generated.shape == (3, 8) and (generated[:, 0] == model.config.decoder_start_token_id).all()
    assert torch.equal(generated, recomputed_greedy(model, source, mask, 7))
    assert len(set(generated[:, 1:].flatten().tolist())) > 1  # not a degenerate constant output


def test_generation_stops_rows_at_eos_and_pads_them():
    model = seq2seq("graph", init_std=0.3)
    source, mask = padded_source()
    free = model.generate(source, max_new_tokens=6, attention_mask=mask, temperature=0.0)
    eos = int(free[0, 2])  # the token row 0 produces second: make it the end of sequence
    stopped = model.generate(source, max_new_tokens=6, attention_mask=mask, temperature=0.0, eos_token_id=eos,
                             pad_token_id=VOCAB - 1)
    for row in range(3):
        hits = (free[row, 1:] == eos).nonzero()
        end = int(hits[0]) + 2 if len(hits) else free.shape[1]  # through the eos token
        assert torch.equal(stopped[row, :end], free[row, :end])
        assert (stopped[row, end:] == VOCAB - 1).all()


def test_cross_attention_keys_and_values_are_projected_once_per_generate(monkeypatch):
    model = seq2seq("graph", n_decoder_layers=3)
    calls = []
    for i, block in enumerate(model.decoder.blocks):
        for attention, kind in ((block.cross_attn, "cross"), (block.attn, "self")):
            project_memory, project = attention.project_memory, attention._project

            def counted(memory, i=i, kind=kind, original=project_memory):
                calls.append((kind, i))
                return original(memory)

            def no_memory(x, memory, kind=kind, original=project):
                assert memory is None, f"{kind}-attention projected the memory outside project_memory"
                return original(x, memory)

            monkeypatch.setattr(attention, "project_memory", counted)
            monkeypatch.setattr(attention, "_project", no_memory)
    source, mask = padded_source()
    model.generate(source, max_new_tokens=6, attention_mask=mask, temperature=0.0)
    assert sorted(calls) == [("cross", 0), ("cross", 1), ("cross", 2)]
    calls.clear()
    model.generate(source, max_new_tokens=3, attention_mask=mask, temperature=0.0)
    assert len(calls) == 3  # once per block again for a new call


def plain_cross_attention(attention, x, memory, memory_mask, scaled):
    """Standard multi-head cross-attention written from scratch: q from ``x``, k/v from ``memory``
    (GQA by repeating key/value heads), padded keys at -inf, output projection."""
    heads, kv_heads, head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
    w_q, w_k, w_v = attention.qkv.weight.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
    batch, tgt, src = x.shape[0], x.shape[1], memory.shape[1]
    q = (x @ w_q.T).view(batch, tgt, heads, head_dim)
    k = (memory @ w_k.T).view(batch, src, kv_heads, head_dim).repeat_interleave(heads // kv_heads, dim=2)
    v = (memory @ w_v.T).view(batch, src, kv_heads, head_dim).repeat_interleave(heads // kv_heads, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / (math.sqrt(head_dim) if scaled else 1.0)
    scores = scores.masked_fill(~memory_mask.bool()[:, None, None, :], float("-inf"))
    out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(batch, tgt, heads * head_dim)
    return out @ attention.out.weight.T


@pytest.mark.parametrize("attention_scale", ["sqrt", "none"])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_dense_cross_attention_equals_plain_cross_attention(attention_scale, n_kv_heads):
    model = seq2seq("dense", attention_scale=attention_scale, n_kv_heads=n_kv_heads)
    attention = model.decoder.blocks[1].cross_attn
    x, memory = torch.randn(3, 5, 32), torch.randn(3, 9, 32)
    _, mask = padded_source()
    expected = plain_cross_attention(attention, x, memory, mask, scaled=attention_scale == "sqrt")
    key_mask = mask.bool()[:, None, None, :]
    projected, record = attention(x, causal=False, mask=key_mask, memory_kv=attention.project_memory(memory))
    from_memory, _ = attention(x, causal=False, mask=key_mask, memory=memory)
    torch.testing.assert_close(projected, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(from_memory, expected, rtol=0, atol=1e-5)
    assert record.head_gates.shape == (3, 5, 4) and (record.head_gates == 1).all()


def test_dense_decoder_block_equals_plain_block():
    """One pre-norm T5-style decoder block, every sub-layer written out here."""
    model = seq2seq("dense", mlp="relu", ffn_hidden=48)
    block, stack = model.decoder.blocks[0], model.decoder
    x, memory = torch.randn(3, 6, 32), torch.randn(3, 9, 32)
    _, mask = padded_source()
    kv = block.cross_attn.project_memory(memory)
    bias = stack.relative_bias(6, 6)
    got, _, _ = block(x, kv, mask.bool()[:, None, None, :], bias=bias)

    def rms(h, norm):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + model.config.norm_eps) * norm.weight

    heads, head_dim = 4, 8
    h = rms(x, block.attn_norm)
    q, k, v = (h @ block.attn.qkv.weight.T).view(3, 6, 3, heads, head_dim).unbind(2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) + bias  # T5: unscaled scores plus the relative bias
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    attended = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(3, 6, 32)
    x1 = x + attended @ block.attn.out.weight.T
    x2 = x1 + plain_cross_attention(block.cross_attn, rms(x1, block.cross_norm), memory, mask, scaled=False)
    mlp = block.ffn.mlp
    expected = x2 + F.relu(rms(x2, block.ffn_norm) @ mlp.fc.weight.T) @ mlp.proj.weight.T
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_labels_are_shifted_right_into_the_decoder_and_scored_unshifted():
    model = seq2seq("linear", decoder_start_token_id=3, pad_token_id=1)
    source, mask = padded_source()
    labels = torch.randint(4, VOCAB, (3, 6))
    labels[1, 4:] = -100
    out = model(source, mask, labels=labels)
    decoder_inputs = torch.cat([torch.full((3, 1), 3), labels[:, :-1]], dim=1)
    decoder_inputs[1, 5] = 1  # the -100 read as the pad id
    explicit = model(source, mask, decoder_input_ids=decoder_inputs)
    torch.testing.assert_close(out.logits, explicit.logits, rtol=0, atol=0)
    keep = labels != -100
    expected = F.cross_entropy(explicit.logits[keep], labels[keep])
    torch.testing.assert_close(out.lm_loss, expected)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert explicit.loss is None
    assert set(out.routing) == {"encoder", "decoder_self", "cross"}
    assert [len(out.routing[kind]) for kind in ("encoder", "decoder_self", "cross")] == [2, 2, 2]
    assert out.routing["cross"][0].head_gates.shape == (3, 6, 4)  # one gate per decoder token and head
    assert out.routing["encoder"][0].head_gates.shape == (3, 9, 4)


def test_scale_decoder_output_scales_the_tied_head_input():
    plain, scaled = seq2seq("graph"), seq2seq("graph", scale_decoder_output=True)
    source, mask = padded_source()
    target = torch.randint(0, VOCAB, (3, 5))
    torch.testing.assert_close(scaled(source, mask, decoder_input_ids=target).logits,
                               plain(source, mask, decoder_input_ids=target).logits * 32 ** -0.5)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("ffn", FFN_KINDS)
def test_every_router_and_ffn_trains(router, ffn):
    model = seq2seq(router, ffn=ffn, n_layers=1, n_decoder_layers=1).train()
    torch.manual_seed(1)
    source = torch.randint(4, 20, (8, 8))
    labels = source.flip(1)  # the task: reverse the source
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(12):
        out = model(source, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        model.update_routing_biases()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_save_then_from_pretrained_gives_the_model_back(tmp_path, tie_embeddings):
    model = seq2seq("graph", ffn="moe", tie_embeddings=tie_embeddings, n_decoder_layers=3,
                    scale_decoder_output=tie_embeddings)
    model.save_pretrained(tmp_path / "s2s")
    source, mask = padded_source()
    target = torch.randint(0, VOCAB, (3, 5))
    expected = model(source, mask, decoder_input_ids=target).logits
    for loaded in (gohgraph.from_pretrained(tmp_path / "s2s"), GoHSeq2Seq.from_pretrained(tmp_path / "s2s")):
        assert type(loaded) is GoHSeq2Seq and loaded.config == model.config
        torch.testing.assert_close(loaded.eval()(source, mask, decoder_input_ids=target).logits, expected,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("overrides,message", [
    (dict(attention="mla", position_embedding="rope"), "model_type='seq2seq' needs attention='mha'"),
    (dict(linear="bitnet"), "model_type='seq2seq' needs linear='standard'"),
    (dict(recursion="mor"), "model_type='seq2seq' needs recursion='none'"),
    (dict(decoder_start_token_id=VOCAB), f"decoder_start_token_id={VOCAB} must be a token id"),
    (dict(pad_token_id=-1), "pad_token_id=-1 must be a token id"),
    (dict(pad_token_id="one"), "pad_token_id='one' must be an integer"),
    (dict(scale_decoder_output="False-ish"), "scale_decoder_output='False-ish' must be True or False"),
    (dict(n_decoder_layers=0), "n_decoder_layers=0 must be >= 1"),
])
def test_bad_config_values_give_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match=message) as info:
        seq2seq_config("graph", **overrides)
    assert "\n" not in str(info.value)


def test_scale_decoder_output_is_refused_outside_seq2seq_and_the_class_checks_its_type():
    with pytest.raises(ValueError, match="scale_decoder_output=True applies to model_type='seq2seq' only"):
        GoHConfig(scale_decoder_output=True)
    with pytest.raises(ValueError, match="GoHSeq2Seq needs model_type='seq2seq'"):
        GoHSeq2Seq(GoHConfig())


def test_bad_inputs_give_one_line_errors():
    model = seq2seq("graph")
    source, mask = padded_source()
    cases = [
        (lambda: model(source, mask), "needs decoder_input_ids or labels"),
        (lambda: model(source, torch.zeros_like(mask), decoder_input_ids=source), "a row without any token"),
        (lambda: model(source, mask * 2, decoder_input_ids=source), "only 0 .padding. and 1"),
        (lambda: model(source, mask[:, :4], decoder_input_ids=source), "attention_mask has shape"),
        (lambda: model(source, mask, decoder_input_ids=source, labels=source[:, :3]), "labels have shape"),
        (lambda: model(source[0], decoder_input_ids=source), r"input_ids must be \[batch, seq\]"),
        (lambda: model.generate(source, max_new_tokens=0), "max_new_tokens=0 must be an integer >= 1"),
        (lambda: model.generate(source, max_new_tokens=40), "exceeds max_seq_len=32"),
        (lambda: model.generate(source + VOCAB, max_new_tokens=2), "input_ids must lie in"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_cross_attention_is_a_goh_attention_with_its_own_router():
    model = seq2seq("graph")
    block = model.decoder.blocks[0]
    assert isinstance(block.cross_attn, GoHAttention) and block.cross_attn.head_routing is not None
    assert block.cross_attn.head_routing is not block.attn.head_routing
