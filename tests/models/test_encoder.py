"""GoHEncoder: padding is invisible, both sides are seen, dense == a plain bidirectional encoder
written here, every router x FFN trains, heads, checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F

from gohgraph import GoHConfig, GoHEncoder, from_pretrained
from gohgraph.config import FFN_KINDS, ROUTERS


def encoder_config(router="graph", **overrides):
    values = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, router=router, router_rounds=2,
                  max_seq_len=32, model_type="encoder", position_embedding="sinusoidal", n_experts=4,
                  top_k_experts=2, n_subtokens=1)
    if router != "dense":
        values.update(n_shared_heads=1, top_k_heads=2)
    values.update(overrides)
    if values.get("ffn") in ("mh-moe", "graph-moe"):
        values.setdefault("n_subtokens", 2)
        values["n_subtokens"] = 2
    return GoHConfig(**values)


def encoder(router="graph", seed=0, **overrides):
    torch.manual_seed(seed)
    model = GoHEncoder(encoder_config(router, **overrides)).eval()
    for module in model.modules():  # give inter-head flow a weight so the tests exercise it
        if hasattr(module, "flow_scale") and module.flow_scale is not None:
            with torch.no_grad():
                module.flow_scale.normal_()
    return model


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_changing_a_padded_position_changes_no_real_output(router, norm_position):
    model = encoder(router, norm_position=norm_position, n_labels=3, classifier_pooling="mean")
    ids = torch.randint(0, 64, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 8:] = 0
    mask[2, 5:] = 0
    changed = ids.clone()
    changed[0, 8:] = torch.randint(0, 64, (4,))
    changed[2, 5:] = torch.randint(0, 64, (7,))
    before, after = model(ids, mask), model(changed, mask)
    real = mask.bool()
    torch.testing.assert_close(before.hidden[real], after.hidden[real], rtol=0, atol=1e-6)
    torch.testing.assert_close(before.class_logits, after.class_logits, rtol=0, atol=1e-6)
    assert not torch.allclose(before.hidden[0, 8:], after.hidden[0, 8:])  # the padded positions did change


@pytest.mark.parametrize("router", ROUTERS)
def test_every_position_sees_both_sides(router):
    model = encoder(router)
    ids = torch.randint(0, 64, (2, 10))
    later, earlier = ids.clone(), ids.clone()
    later[:, 9] = (ids[:, 9] + 1) % 64
    earlier[:, 0] = (ids[:, 0] + 1) % 64
    base = model(ids).hidden
    assert (model(later).hidden[:, :9] - base[:, :9]).abs().amax(-1).min() > 1e-6  # every earlier token moved
    assert (model(earlier).hidden[:, 1:] - base[:, 1:]).abs().amax(-1).min() > 1e-6  # every later token moved


def plain_encoder(model, ids, mask):
    """A post-norm bidirectional encoder (Vaswani/BERT) with standard MHA and an erf-GELU MLP,
    written from scratch; reads only the model's weights."""
    cfg = model.config
    d, heads = cfg.d_model, cfg.n_heads
    hd = d // heads
    pos = torch.arange(ids.shape[1], dtype=torch.float32)[:, None]
    i = torch.arange(0, d, 2, dtype=torch.float32)
    angle = pos / 10000 ** (i / d)
    table = torch.stack([angle.sin(), angle.cos()], -1).reshape(ids.shape[1], d)  # sin, cos interleaved
    x = model.embed.weight[ids] + table
    stack = model.encoder
    x = F.layer_norm(x, (d,), stack.embedding_norm.weight, stack.embedding_norm.bias, cfg.norm_eps)
    for block in stack.blocks:
        attn = block.attn
        q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).split(d, -1)
        q, k, v = (t.view(*ids.shape, heads, hd).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        o = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(*ids.shape, d)
        x = F.layer_norm(x + F.linear(o, attn.out.weight, attn.out.bias), (d,),
                         block.attn_norm.weight, block.attn_norm.bias, cfg.norm_eps)
        mlp = block.ffn.mlp
        hidden = F.linear(x, mlp.fc.weight, mlp.fc.bias)
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        x = F.layer_norm(x + F.linear(hidden, mlp.proj.weight, mlp.proj.bias), (d,),
                         block.ffn_norm.weight, block.ffn_norm.bias, cfg.norm_eps)
    return x


def test_dense_router_is_a_plain_bidirectional_encoder():
    model = encoder("dense", norm_position="post", embedding_norm=True, norm="layer", mlp="gelu-exact",
                    linear_bias=True)
    with torch.no_grad():  # non-trivial norm affines and biases
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.2)
    ids = torch.randint(0, 64, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    got = model(ids, mask).hidden
    want = plain_encoder(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("ffn", FFN_KINDS)
def test_every_router_and_ffn_trains(router, ffn):
    model = encoder(router, ffn=ffn, mlp="relu", n_labels=0).train()
    torch.manual_seed(1)
    ids = torch.randint(0, 16, (8, 12))  # a small alphabet: the masked token is learnable from its context
    ids[:, 1::2] = ids[:, 0::2]  # every odd token repeats its left neighbour
    labels = torch.full_like(ids, -100)
    labels[:, 1::2] = ids[:, 1::2]
    inputs = ids.clone()
    inputs[:, 1::2] = 63  # the mask token
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        out = model(inputs, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        model.update_routing_biases()
        losses.append(out.mlm_loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("pooling", ["first", "mean", "first-tanh"])
def test_classification_head_pools_as_configured(pooling):
    model = encoder("linear", n_labels=3, classifier_pooling=pooling)
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    out = model(ids, mask, class_labels=torch.tensor([0, 2]))
    hidden = out.hidden
    if pooling == "mean":
        pooled = torch.stack([hidden[0].mean(0), hidden[1, :4].mean(0)])
    elif pooling == "first":
        pooled = hidden[:, 0]
    else:
        pooled = torch.tanh(model.pooler(hidden[:, 0]))
    want = pooled @ model.classifier.weight.t() + model.classifier.bias
    torch.testing.assert_close(out.class_logits, want)
    assert out.logits is None  # a classifier skips the vocabulary projection unless asked for MLM
    torch.testing.assert_close(out.class_loss, F.cross_entropy(want, torch.tensor([0, 2])))


def test_mlm_loss_is_cross_entropy_at_labelled_positions_plus_aux():
    model = encoder("graph", tie_embeddings=True)
    ids = torch.randint(0, 64, (2, 9))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    out = model(ids, labels=labels)
    torch.testing.assert_close(out.logits, out.hidden @ model.embed.weight.t())
    want = F.cross_entropy(out.logits[:, 3], ids[:, 3])
    torch.testing.assert_close(out.mlm_loss, want)
    torch.testing.assert_close(out.loss, want + out.aux_loss)
    assert len(out.routing) == 2 and out.routing[0].head_gates.shape == (2, 9, 4)


@pytest.mark.parametrize("position_embedding", ["sinusoidal", "learned", "rope", "t5-relative"])
def test_save_then_from_pretrained_gives_the_encoder_back(tmp_path, position_embedding):
    model = encoder("graph", n_labels=2, position_embedding=position_embedding, mlm_transform=True)
    model.save_pretrained(tmp_path / "enc")
    loaded = from_pretrained(tmp_path / "enc")
    assert type(loaded) is GoHEncoder
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(loaded(ids, labels=ids).logits, model(ids, labels=ids).logits, rtol=0, atol=0)


def test_family_fields_are_checked():
    with pytest.raises(ValueError, match="norm_position='middle' is not one of"):
        encoder_config(norm_position="middle")
    with pytest.raises(ValueError, match="n_labels=2 must be"):
        GoHConfig(n_labels=2)
    with pytest.raises(ValueError, match="model_type='encoder'"):
        GoHEncoder(GoHConfig())
    with pytest.raises(ValueError, match="n_labels='true' must be an integer"):
        encoder_config(n_labels="true")
