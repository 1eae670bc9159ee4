"""GoHTransformer: causality, KV-cache generation, dense == reference MHA, gradients, checkpoints."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gohgraph import CheckpointError, GoHConfig, GoHTransformer
from gohgraph.config import ROUTERS
from gohgraph.models.block import build_attention
from tests.references import reference_mha


def tiny_config(router="graph", **overrides):
    values = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=8, n_shared_heads=2, top_k_heads=3,
                  router=router, router_rounds=2, max_seq_len=64)
    values.update(overrides)
    return GoHConfig(**values)


def tiny_model(router="graph", seed=0, **overrides):
    torch.manual_seed(seed)
    model = GoHTransformer(tiny_config(router, **overrides)).eval()
    if router == "graph":  # give flow a non-zero weight so the test exercises it
        for block in model.blocks:
            with torch.no_grad():
                block.attn.head_routing.flow_scale.normal_()
    return model


@pytest.mark.parametrize("router", ROUTERS)
def test_future_tokens_never_change_past_logits(router):
    model = tiny_model(router)
    ids = torch.randint(0, 64, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 64, (2, 8))
    before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(before[:, :12], after[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 12:], after[:, 12:])


@pytest.mark.parametrize("router,kv_heads", [(r, None) for r in ROUTERS] + [("graph", 2), ("linear", 1)])
def test_kv_cache_generation_equals_full_recompute(router, kv_heads):
    model = tiny_model(router, n_kv_heads=kv_heads)
    prompt = torch.randint(0, 64, (3, 5))
    cached = model.generate(prompt, max_new_tokens=20, temperature=0)
    recomputed = model.generate(prompt, max_new_tokens=20, temperature=0, use_cache=False)
    assert cached.shape == (3, 25)
    assert torch.equal(cached, recomputed)
    # and greedy decoding really is argmax of the full recompute at every step
    logits = model(cached).logits
    assert torch.equal(logits[:, 4:-1].argmax(-1), cached[:, 5:])


def test_cached_prefill_in_chunks_matches_one_pass():
    from gohgraph.layers.kv_cache import DynamicKVCache
    model = tiny_model("graph", n_kv_heads=4)
    ids = torch.randint(0, 64, (2, 16))
    cache = DynamicKVCache(model.config.n_layers)
    chunks = [model(ids[:, :7], cache=cache).logits, model(ids[:, 7:11], cache=cache).logits,
              model(ids[:, 11:], cache=cache).logits]
    torch.testing.assert_close(torch.cat(chunks, 1), model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position_embedding", ["rope", "learned"])
def test_embedding_norm_normalises_the_blocks_input(position_embedding):
    """``embedding_norm=True`` puts a norm between the (position-added) embeddings and the first block,
    in the forward, cached decoding and the compiled decode step alike."""
    model = tiny_model("linear", embedding_norm=True, position_embedding=position_embedding)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    ids = torch.randint(0, 64, (2, 9))
    logits = model(ids).logits
    embedded = model.embed(ids)
    if model.position_embed is not None:
        embedded = model.position_embed(embedded, 0)
    torch.testing.assert_close(seen[0], model.embedding_norm(embedded))
    with torch.no_grad():  # the norm's weight reaches the logits: it is applied, not only stored
        model.embedding_norm.weight.mul_(3.0)
    assert not torch.allclose(model(ids).logits, logits)
    prompt = ids[:, :5]
    cached = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=6, temperature=0, use_cache=False))
    # the compiled generation's one-token step (run eagerly here: the same function) applies it too
    from gohgraph.models.compiled_decode import CompiledDecoder, decode_step

    cache = model.new_cache("static", 12)
    with torch.no_grad():
        first = model(prompt, cache=cache).logits[:, -1]
        step_logits = CompiledDecoder(model, cache, None, decode_step)(cached[:, 5:6])
    torch.testing.assert_close(first.argmax(-1), cached[:, 5])
    torch.testing.assert_close(step_logits, model(cached[:, :6]).logits[:, -1], rtol=1e-5, atol=1e-5)


def test_graph_router_gates_exactly_shared_plus_top_k_heads():
    model = tiny_model("graph")
    routing = model(torch.randint(0, 64, (4, 30))).routing
    for layer in routing:
        active = layer.head_gates > 0
        assert (active.sum(-1) == 5).all()
        assert active[..., :2].all()
        assert layer.flow.shape == (4, 30, 56)
        inactive_sources = ~active[..., model.blocks[0].attn.head_routing.router.edge_index[0]]
        assert (layer.flow[inactive_sources] == 0).all()


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_dense_router_is_exactly_standard_attention(kv_heads):
    torch.manual_seed(0)
    cfg = tiny_config("dense", n_kv_heads=kv_heads, d_model=64)
    attn = build_attention(cfg, 0)
    x = torch.randn(2, 17, 64)
    y, routing = attn(x)
    expected = reference_mha(x, attn.qkv.weight, attn.out.weight, cfg.n_heads, cfg.kv_heads)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(routing.head_gates, torch.ones(2, 17, 8))


def test_graph_router_with_every_head_active_and_uniform_logits_is_standard_attention():
    torch.manual_seed(0)
    cfg = tiny_config("graph", n_shared_heads=2, top_k_heads=6, d_model=64)
    attn = build_attention(cfg, 0)
    with torch.no_grad():
        attn.head_routing.router.score.weight.zero_()  # uniform logits; flow_scale starts at 0
    x = torch.randn(2, 9, 64)
    expected = reference_mha(x, attn.qkv.weight, attn.out.weight, 8, 8)
    torch.testing.assert_close(attn(x)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router, ffn, extra", [
    ("linear", "dense", {}), ("graph", "dense", {}), ("dense", "moe", {}), ("dense", "mh-moe", {}),
    ("graph", "graph-moe", {}),
    ("linear", "moe", dict(linear="bitnet", head_router_noise="noisy-top-k", expert_router_noise="gumbel")),
    ("dense", "dense", dict(recursion="mor", recursion_router="expert-choice")),
    ("graph", "dense", dict(recursion="mor", recursion_router="token-choice", recursion_kv="shared"))])
def test_model_cast_to_bf16_trains_and_generates(router, ffn, extra):
    """``model.to(torch.bfloat16)`` (bf16 weights, no autocast) runs every router and FFN, BitNet
    projections, stochastic routing and Mixture-of-Recursions."""
    experts = dict(n_experts=4, top_k_experts=2, n_subtokens=1 if ffn == "moe" else 2) if ffn != "dense" else {}
    model = tiny_model(router, ffn=ffn, **experts, **extra).train()
    ids = torch.randint(0, 64, (2, 24))
    torch.manual_seed(1)  # the same noise draws in both precisions
    loss_fp32 = model(ids, labels=ids).loss.item()
    model.to(torch.bfloat16)
    torch.manual_seed(1)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert abs(loss.item() - loss_fp32) < 0.05 * loss_fp32  # the same model, rounded to bf16
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)
    generated = model.eval().generate(ids[:, :5], max_new_tokens=4)
    assert generated.shape == (2, 9) and torch.equal(generated[:, :5], ids[:, :5])


@pytest.mark.parametrize("router", ROUTERS)
def test_gradients_reach_every_learnable_parameter(router):
    model = tiny_model(router)
    model.train()
    ids = torch.randint(0, 64, (2, 24))
    model(ids, labels=ids).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    if router not in ("dense", "query-norm"):  # query-norm is parameter-free
        assert any("router" in name for name, _ in model.named_parameters())


def test_loss_is_next_token_cross_entropy_plus_weighted_aux():
    model = tiny_model("graph")
    ids = torch.randint(0, 64, (2, 10))
    out = model(ids, labels=ids)
    expected_lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, expected_lm)
    cfg = model.config
    expected_aux = sum(cfg.balance_loss_coef * r.aux_losses["head_balance"] + cfg.z_loss_coef * r.aux_losses["head_z"]
                       for r in out.routing)
    torch.testing.assert_close(out.aux_loss, expected_aux)
    torch.testing.assert_close(out.loss, expected_lm + expected_aux)


# ------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("router", ROUTERS)
def test_save_then_load_gives_identical_logits(tmp_path, router):
    model = tiny_model(router, n_kv_heads=4, head_graph="ring")
    model.save_pretrained(tmp_path / "ckpt")
    loaded = GoHTransformer.from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.randint(0, 64, (2, 12))
    assert loaded.config == model.config
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]


def test_truncated_checkpoint_raises_clear_error(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt or truncated"):
        GoHTransformer.from_pretrained(tmp_path)


def test_corrupt_config_raises_clear_error(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"d_model": 32,')
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        GoHTransformer.from_pretrained(tmp_path)


def test_mismatched_checkpoint_raises_and_names_the_tensors(tmp_path):
    tiny_model("graph").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(tiny_config("graph", d_model=48).to_json())
    with pytest.raises(CheckpointError, match=r"shape mismatches.*attn.qkv.weight: checkpoint \[96, 32\] vs model \[144, 48\]"):
        GoHTransformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(tiny_config("linear").to_json())
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        GoHTransformer.from_pretrained(tmp_path)


def test_missing_directory_raises_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        GoHTransformer.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="missing file .*config.json"):
        GoHTransformer.from_pretrained(tmp_path)


def test_failed_save_leaves_existing_checkpoint_intact(tmp_path, monkeypatch):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    from gohgraph import storage as checkpoint

    def exploding_save(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", exploding_save)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    torch.testing.assert_close(GoHTransformer.from_pretrained(tmp_path).embed.weight, model.embed.weight - 1.0)
