"""Upcycling dense Hugging Face models into GoH models (gohgraph/convert.py) and the pieces it adds.

The references are independent: the Hugging Face model itself (logits, greedy decoding), a
``router="dense"`` GoH model holding the same weights, and the blend formula written out.
Tests that need ``transformers`` (the optional ``hf`` extra) skip without it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.cli.main import main as cli_main
from gohgraph.interop.convert import SOURCE_FIELDS, convert_hf_model, load_hf_model, read_hf_config
from gohgraph.interop.source import ConversionError
from gohgraph.training.schedules import dense_to_sparse_schedule

TINY = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)


# ---------------------------------------------------------------------- schedule and blend (no transformers)
def test_dense_to_sparse_schedule_is_linear_from_one_to_zero():
    assert [dense_to_sparse_schedule(step, 4) for step in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert dense_to_sparse_schedule(0, 0) == 0.0  # no warm-up: sparse at once
    with pytest.raises(ValueError, match="warmup_steps"):
        dense_to_sparse_schedule(0, -1)
    with pytest.raises(ValueError, match="step"):
        dense_to_sparse_schedule(-1, 4)


def test_dense_blend_one_equals_dense_router_with_the_same_weights():
    torch.manual_seed(0)
    routed = GoHTransformer(GoHConfig(**TINY, router="graph", n_shared_heads=1, top_k_heads=1))
    # a fresh layer's inter-head flow contributes nothing (flow_scale 0), so blend 1 is dense attention
    assert all(torch.equal(block.attn.head_routing.flow_scale, torch.zeros(4)) for block in routed.blocks)
    dense = GoHTransformer(GoHConfig(**TINY, router="dense"))
    dense.load_state_dict(routed.state_dict(), strict=False)
    ids = torch.randint(0, 256, (2, 12))
    routed.set_dense_blend(1.0)
    torch.testing.assert_close(routed(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)
    routed.set_dense_blend(0.0)
    assert (routed(ids).logits - dense(ids).logits).abs().max() > 1e-3  # routing really is on at blend 0


def test_dense_blend_mixes_gates_and_flow_sources_linearly():
    torch.manual_seed(1)
    model = GoHTransformer(GoHConfig(**TINY, router="graph", n_shared_heads=1, top_k_heads=1)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.head_routing.flow_scale.fill_(0.5)
    ids = torch.randint(0, 256, (1, 10))
    records = {}
    for blend in (0.0, 0.3, 1.0):
        model.set_dense_blend(blend)
        records[blend] = model(ids).routing[0]
    sparse, mixed, dense = records[0.0], records[0.3], records[1.0]
    n_inactive = (sparse.head_gates == 0).sum(-1)
    assert torch.equal(n_inactive, torch.full_like(n_inactive, 2))  # 4 heads: 1 shared + 1 of 3 routed
    torch.testing.assert_close(mixed.head_gates, 0.3 + 0.7 * sparse.head_gates)
    assert torch.equal(dense.head_gates, torch.ones_like(dense.head_gates))
    # unselected heads send flow at the blend weight: flow_b = b * flow(all on) + (1 - b) * flow(top-k)
    torch.testing.assert_close(mixed.flow, 0.3 * dense.flow + 0.7 * sparse.flow)
    with pytest.raises(ValueError, match="dense_blend"):
        model.set_dense_blend(1.5)


def test_dense_blend_is_saved_with_the_checkpoint(tmp_path):
    model = GoHTransformer(GoHConfig(**TINY, router="linear", top_k_heads=2))
    model.set_dense_blend(0.25)
    reloaded = GoHTransformer.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    blends = [float(b) for name, b in reloaded.named_buffers() if name.endswith("dense_blend")]
    assert blends == [0.25] * TINY["n_layers"]


# ---------------------------------------------------------------------- new GoHConfig options (no transformers)
@pytest.mark.parametrize("field, value, allowed", [
    ("position_embedding", "sinusoidal-x", "rope"), ("mlp", "silu", "swiglu"), ("linear_bias", "yes", "True or False")])
def test_new_config_fields_reject_bad_values(field, value, allowed):
    with pytest.raises(ValueError, match=rf"{field}=.*{allowed}"):
        GoHConfig(**{field: value})


def test_new_config_defaults_keep_the_llama_style_model():
    cfg = GoHConfig(d_model=48)
    assert (cfg.position_embedding, cfg.linear_bias, cfg.mlp) == ("rope", False, "swiglu")
    assert cfg.hidden_dim == 128  # SwiGLU's 8/3 * d_model rounded up to a multiple of 8
    assert GoHConfig(d_model=48, mlp="gelu").hidden_dim == 4 * 48  # GPT-2's MLP width
    names = set(GoHTransformer(GoHConfig(**TINY)).state_dict())
    assert not any(name.endswith(".bias") or "position_embed" in name for name in names)


def test_learned_positions_with_kv_cache_match_full_recompute():
    torch.manual_seed(2)
    cfg = GoHConfig(**{**TINY, "d_model": 36, "n_heads": 4}, position_embedding="learned", linear_bias=True,
                    mlp="gelu", norm="layer", router="graph", top_k_heads=2)  # head_dim 9: odd is fine without RoPE
    model = GoHTransformer(cfg)
    prompt = torch.randint(0, 256, (2, 5))
    cached = model.generate(prompt, max_new_tokens=8, temperature=0)
    recomputed = model.generate(prompt, max_new_tokens=8, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


# ---------------------------------------------------------------------- errors (no transformers)
def _write_config(directory: Path, values: dict, weights: bool = True) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(values))
    if weights:
        (directory / "model.safetensors").write_bytes(b"")
    return directory


def test_unsupported_architecture_names_what_was_found_and_what_is_supported(tmp_path):
    falcon = _write_config(tmp_path / "falcon", {"model_type": "falcon", "architectures": ["FalconForCausalLM"]})
    with pytest.raises(ConversionError, match=r"model_type='falcon'.*FalconForCausalLM.*llama \(LlamaForCausalLM\)"
                                              r".*gpt2 \(GPT2LMHeadModel\)"):
        convert_hf_model(falcon)
    head = _write_config(tmp_path / "cls", {"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]})
    with pytest.raises(ConversionError, match="LlamaForSequenceClassification"):
        read_hf_config(head)


def test_missing_directory_config_or_weights_name_the_directory(tmp_path):
    with pytest.raises(ConversionError, match=r"directory .*nowhere does not exist"):
        convert_hf_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ConversionError, match=r"empty has no config.json \(found: \['notes.txt'\]\)"):
        convert_hf_model(tmp_path / "empty")
    bare = _write_config(tmp_path / "bare", {"model_type": "gpt2"}, weights=False)
    with pytest.raises(ConversionError, match=r"bare has no weights: expected one of \['model.safetensors'"):
        convert_hf_model(bare)


def test_cli_convert_reports_errors_in_one_line(tmp_path, capsys):
    falcon = _write_config(tmp_path / "falcon", {"model_type": "falcon"})
    assert cli_main(["convert", "--from", str(falcon), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gohgraph convert: error:") and "model_type='falcon'" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_core_imports_and_missing_transformers_gives_install_hint(tmp_path):
    llama = _write_config(tmp_path / "llama", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    script = (  # a fresh interpreter in which `import transformers` fails, as without the hf extra
        "import sys; sys.modules['transformers'] = None\n"
        "import gohgraph, gohgraph.interop.convert, gohgraph.cli.main\n"
        "assert 'convert' in gohgraph.cli.main.build_parser().format_help()\n"
        f"try:\n    gohgraph.interop.convert.load_hf_model({str(llama)!r})\n"
        "except ImportError as err:\n    print(err)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install 'gohgraph[hf]'" in result.stdout


# ---------------------------------------------------------------------- against Hugging Face models
def _transformers():
    return pytest.importorskip("transformers", reason="the optional hf extra (transformers) is not installed")


def _randomised(hf_model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights of visible size (norm gains around 1, biases nonzero) so every copied tensor matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_gain = param.dim() == 1 and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_gain else 0.15 * noise)
    return hf_model.eval()


def _llama(seed: int = 0, **overrides):
    transformers = _transformers()
    values = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5,
                  bos_token_id=0, eos_token_id=0)
    values.update(overrides)
    torch.manual_seed(seed)
    return _randomised(transformers.LlamaForCausalLM(transformers.LlamaConfig(**values)), seed)


def _gpt2(seed: int = 0, **overrides):
    transformers = _transformers()
    values = dict(vocab_size=256, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    values.update(overrides)
    torch.manual_seed(seed)
    return _randomised(transformers.GPT2LMHeadModel(transformers.GPT2Config(**values)), seed)


def _mixtral(seed: int = 0, **overrides):
    transformers = _transformers()
    values = dict(vocab_size=256, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
                  rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
    values.update(overrides)
    torch.manual_seed(seed)
    return _randomised(transformers.MixtralForCausalLM(transformers.MixtralConfig(**values)), seed)



def _qwen2_moe(seed: int = 0, **overrides):
    transformers = _transformers()
    values = dict(vocab_size=256, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
                  shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
                  eos_token_id=0)
    values.update(overrides)
    torch.manual_seed(seed)
    return _randomised(transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**values)), seed)

def _assert_same_logits(hf_model, goh_model, ids):
    with torch.no_grad():
        reference, converted = hf_model(ids).logits, goh_model.eval()(ids).logits
    assert reference.abs().max() > 1.0  # logits large enough for 1e-4 to be a strict tolerance
    torch.testing.assert_close(converted, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("source, routing", [
    (dict(), dict(router="graph", n_shared_heads=1, top_k_heads=1)),  # GQA: 4 query heads on 2 kv heads
    (dict(num_key_value_heads=1, tie_word_embeddings=True), dict(router="linear", top_k_heads=2)),  # MQA, tied
    (dict(num_key_value_heads=4, attention_bias=True), dict(router="graph", top_k_heads=3)),  # MHA + biases
    (dict(), dict(router="query-norm", n_shared_heads=2, top_k_heads=1)),  # MoH-LLaMA3's continue-tuning
])
def test_llama_conversion_reproduces_logits(source, routing):
    hf_model = _llama(**source)
    model = convert_hf_model(hf_model, **routing)
    assert model.config.n_kv_heads == (None if source.get("num_key_value_heads") == 4
                                       else source.get("num_key_value_heads", 2))
    assert model.config.rope_theta == 500.0
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    _assert_same_logits(hf_model, model, ids)
    model.set_dense_blend(0.0)  # the configured top-k routing now changes the function
    with torch.no_grad():
        assert (model(ids).logits - hf_model(ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("source", [dict(), dict(n_inner=40, tie_word_embeddings=False)])
def test_gpt2_conversion_reproduces_logits(source):
    hf_model = _gpt2(**source)
    model = convert_hf_model(hf_model, n_shared_heads=2, top_k_heads=1)
    assert (model.config.position_embedding, model.config.mlp, model.config.linear_bias) == ("learned", "gelu", True)
    _assert_same_logits(hf_model, model, torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("make_source", [_llama, _gpt2, _mixtral, _qwen2_moe])
def test_cached_greedy_decoding_matches_hugging_face(make_source):
    hf_model = make_source(seed=5)
    model = convert_hf_model(hf_model, top_k_heads=2)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(6))
    reference = ids
    with torch.no_grad():  # greedy decoding by full recompute with the Hugging Face model
        for _ in range(6):
            next_ids = hf_model(reference).logits[:, -1].argmax(-1, keepdim=True)
            reference = torch.cat([reference, next_ids], dim=1)
    assert torch.equal(model.generate(ids, max_new_tokens=6, temperature=0), reference)


def test_conversion_from_a_saved_directory_and_reload(tmp_path):
    hf_model = _llama(seed=7)
    hf_model.save_pretrained(tmp_path / "hf")
    loaded = load_hf_model(tmp_path / "hf")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    model = convert_hf_model(tmp_path / "hf", top_k_heads=2, n_shared_heads=1)
    reloaded = GoHTransformer.from_pretrained(model.save_pretrained(tmp_path / "goh"))
    _assert_same_logits(hf_model, reloaded, torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(8)))


def test_multi_shard_checkpoint_loads_and_pickles_are_refused(tmp_path):
    hf_model = _mixtral(seed=5)
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    model = convert_hf_model(tmp_path / "sharded", top_k_heads=2)
    _assert_same_logits(hf_model, model, torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2)))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConversionError, match="only pickled weights .pytorch_model.bin., which gohgraph never loads"):
        convert_hf_model(pickled)


def test_cli_convert_writes_a_dense_equivalent_checkpoint(tmp_path, capsys):
    hf_model = _gpt2(seed=9)
    hf_model.save_pretrained(tmp_path / "hf")
    code = cli_main(["convert", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "goh"),
                     "--router", "graph", "--n-shared-heads", "1", "--top-k-heads", "2"])
    assert code == 0 and "active heads 3/4" in capsys.readouterr().out
    model = GoHTransformer.from_pretrained(tmp_path / "goh")
    assert (model.config.router, model.config.n_shared_heads, model.config.top_k_heads) == ("graph", 1, 2)
    _assert_same_logits(hf_model, model, torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(10)))


@pytest.mark.parametrize("n_shared_experts", [0, 1])
def test_moe_upcycling_reproduces_llama_logits(n_shared_experts):
    hf_model = _llama(seed=11)
    model = convert_hf_model(hf_model, top_k_heads=2, ffn="moe", n_experts=4, top_k_experts=2,
                             n_shared_experts=n_shared_experts)
    assert model.config.expert_hidden_dim == 48  # each expert is a full copy of the dense MLP
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(12))
    _assert_same_logits(hf_model, model, ids)
    out = model(ids)
    assert out.routing[0].expert_indices.shape == (2, 16, 1, 2)


def test_conversion_rejects_what_it_cannot_reproduce():
    transformers = _transformers()
    with pytest.raises(ConversionError, match="bias-free SwiGLU"):
        convert_hf_model(_gpt2(), ffn="moe")
    with pytest.raises(ConversionError, match=r"cannot override \['d_model'\]"):
        convert_hf_model(_gpt2(), d_model=64)
    assert "d_model" in SOURCE_FIELDS
    with pytest.raises(ConversionError, match="ffn='graph-moe' cannot be upcycled"):
        convert_hf_model(_llama(), ffn="graph-moe")
    with pytest.raises(ConversionError, match="cannot convert LlamaModel"):
        convert_hf_model(_llama().model)
    scaled = _llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0})
    with pytest.raises(ConversionError, match="rope_type='dynamic'"):
        convert_hf_model(scaled)
    with pytest.raises(ConversionError, match="max_seq_len=128 exceeds"):
        convert_hf_model(_gpt2(), max_seq_len=128)
    assert transformers is not None


def test_converted_model_trains_with_annealed_top_k_heads():
    """Dense -> top-k over a short warm-up, then sparse training still lowers the loss on real text."""
    hf_model = _llama(seed=13)
    model = convert_hf_model(hf_model, router="graph", n_shared_heads=1, top_k_heads=1).train()
    text = Path(json.__file__).read_bytes()[:4 * 32]
    batch = torch.tensor(list(text), dtype=torch.long).view(4, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    warmup, losses = 8, []
    for step in range(24):
        model.set_dense_blend(dense_to_sparse_schedule(step, warmup))
        out = model(batch, labels=batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.lm_loss.item())
    gates = model(batch).routing[0].head_gates
    assert torch.equal((gates == 0).sum(-1), torch.full((4, 32), 2))  # sparse: 2 of 4 heads off
    assert losses[-1] < 0.75 * losses[warmup]  # after the switch to top-k routing, training continues


def test_checkpoint_missing_tensors_is_an_error_not_a_random_init(tmp_path):
    transformers = _transformers()
    base = transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4))
    base.save_pretrained(tmp_path)  # a body without lm_head, relabelled as a causal LM
    values = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**values, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConversionError, match=r"lacks tensors \['lm_head.weight'\]"):
        convert_hf_model(tmp_path)


def test_convert_carries_the_tokenizer_and_training_uses_it(tmp_path, capsys):
    """convert -> train --init-from: the source's tokenizer.json travels with the model, training
    encodes the data with it, and a vocabulary that does not match is refused."""
    tokenizers = pytest.importorskip("tokenizers")
    text = tmp_path / "code.txt"
    text.write_text("".join(f"def f_{i}(x):\n    return x + {i}\n" for i in range(200)), encoding="utf-8")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator([text.read_text()], tokenizers.trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    vocab = bpe.get_vocab_size()
    hf_model = _llama(seed=3, vocab_size=vocab)
    hf_model.save_pretrained(tmp_path / "hf")
    bpe.save(str(tmp_path / "hf" / "tokenizer.json"))
    out = tmp_path / "goh"
    assert cli_main(["convert", "--from", str(tmp_path / "hf"), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
    assert "nothing to anneal to" in printed.err  # every head on: annealing would do nothing
    assert cli_main(["convert", "--from", str(tmp_path / "hf"), "--out", str(out), "--top-k-heads", "2"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["convert", "--from", str(tmp_path / "hf"), "--out", str(out), "--top-k-heads", "2",
                     "--overwrite"]) == 0
    assert GoHTransformer.from_pretrained(out).config.top_k_heads == 2

    small = ["--data", str(text), "--cache-dir", str(tmp_path / "cache"), "--max-steps", "1", "--batch-size", "2",
             "--seq-len", "16", "--no-progress", "--device", "cpu", "--set", "eval_batches=1",
             "--set", "tensorboard=false"]
    assert cli_main(["train", "--init-from", str(out), "--run-dir", str(tmp_path / "run"), *small]) == 0
    run_tokenizer = tmp_path / "run" / "tokenizer.json"
    same_vocab = json.loads(run_tokenizer.read_text())["model"]["vocab"] == \
        json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert run_tokenizer.is_file() and same_vocab
    assert cli_main(["train", "--init-from", str(out), "--run-dir", str(tmp_path / "run-bytes"),
                     "--tokenizer", "byte", *small]) == 1
    assert f"vocab_size={vocab} but the data's tokenizer has 256 tokens" in capsys.readouterr().err


def test_init_from_learned_positions_names_seq_len_not_tensor_shapes(tmp_path, capsys):
    _gpt2(seed=4).save_pretrained(tmp_path / "hf")
    assert cli_main(["convert", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "goh")]) == 0
    text = tmp_path / "code.txt"
    text.write_text("def f(x):\n    return x\n" * 100, encoding="utf-8")
    code = cli_main(["train", "--init-from", str(tmp_path / "goh"), "--run-dir", str(tmp_path / "run"),
                     "--data", str(text), "--cache-dir", str(tmp_path / "cache"), "--seq-len", "100",
                     "--max-steps", "1", "--no-progress", "--device", "cpu"])
    assert code == 1
    err = capsys.readouterr().err
    assert "seq_len=100 needs 101 positions" in err and "learned position table of 64" in err


def test_mixtral_conversion_reproduces_logits(tmp_path):
    hf_model = _mixtral(seed=7)
    hf_model.save_pretrained(tmp_path / "hf")
    model = convert_hf_model(tmp_path / "hf", n_shared_heads=1, top_k_heads=2)  # from the saved directory
    cfg = model.config
    assert (cfg.ffn, cfg.n_experts, cfg.top_k_experts, cfg.expert_hidden) == ("moe", 4, 2, 24)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(8))
    _assert_same_logits(hf_model, model, ids)
    with pytest.raises(ConversionError, match="cannot override"):
        convert_hf_model(hf_model, n_experts=8)  # the experts come from the source
    windowed = _mixtral(seed=9, sliding_window=5)  # Mixtral's window is kept, as Mistral's
    assert convert_hf_model(windowed).config.sliding_window == 5
    _assert_same_logits(windowed, convert_hf_model(windowed), torch.randint(0, 256, (2, 14)))


def test_cli_converts_a_mixtral_checkpoint(tmp_path, capsys):
    hf_model = _mixtral(seed=9)
    hf_model.save_pretrained(tmp_path / "hf")
    assert cli_main(["convert", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "goh")]) == 0
    model = GoHTransformer.from_pretrained(tmp_path / "goh")
    assert model.config.ffn == "moe" and model.config.n_experts == 4
    _assert_same_logits(hf_model, model, torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("renormalise", [False, True])
def test_qwen2_moe_conversion_reproduces_logits(renormalise):
    hf_model = _qwen2_moe(seed=3, norm_topk_prob=renormalise)
    model = convert_hf_model(hf_model, n_shared_heads=1, top_k_heads=2)
    cfg = model.config
    assert (cfg.n_experts, cfg.n_shared_experts, cfg.expert_renormalise, cfg.shared_expert_gate) == \
        (5, 1, renormalise, True)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    _assert_same_logits(hf_model, model, ids)
    with pytest.raises(ConversionError, match="dense layers between the sparse ones"):
        convert_hf_model(_qwen2_moe(decoder_sparse_step=2))


def _mistral(seed: int = 0, **overrides):
    transformers = _transformers()
    values = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, sliding_window=6, rms_norm_eps=1e-5,
                  bos_token_id=0, eos_token_id=0)
    values.update(overrides)
    torch.manual_seed(seed)
    return _randomised(transformers.MistralForCausalLM(transformers.MistralConfig(**values)), seed)


def test_mistral_conversion_keeps_the_sliding_window():
    hf_model = _mistral(seed=21)
    model = convert_hf_model(hf_model, router="dense")
    assert model.config.sliding_window == 6
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    _assert_same_logits(hf_model, model, ids)  # 24 positions: four windows deep
    prompt = ids[:1, :4]
    with torch.no_grad():
        reference = hf_model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    ours = model.eval().generate(prompt, max_new_tokens=20, temperature=0.0)  # rolling cache of 5 positions
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16, "rope_theta": 500.0},
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
])
def test_llama_rope_scaling_conversion_reproduces_logits(rope):
    hf_model = _llama(seed=22, rope_parameters=rope, max_position_embeddings=64)
    model = convert_hf_model(hf_model, router="graph", n_shared_heads=1, top_k_heads=2)
    assert (model.config.rope_scaling, model.config.rope_scaling_factor) == (rope["rope_type"], rope["factor"])
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(5))  # past the original 16
    _assert_same_logits(hf_model, model, ids)
    unscaled = convert_hf_model(_llama(seed=22, max_position_embeddings=64), router="dense")
    with torch.no_grad():  # the same weights without the scaling give other logits: the scaling is used
        assert (unscaled.eval()(ids).logits - hf_model(ids).logits).abs().max() > 1e-2


def _deepseek_v3(seed: int = 0, **overrides):
    transformers = _transformers()
    values = dict(vocab_size=256, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
                  num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
                  kv_lora_rank=16, q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6,
                  max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0)
    values.update(overrides)
    torch.manual_seed(seed)
    hf_model = _randomised(transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**values)), seed)
    with torch.no_grad():  # a spread of correction biases: selection differs from the plain top-k
        for layer in hf_model.model.layers[values["first_k_dense_replace"]:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, 8)[torch.randperm(8)])
    return hf_model


@pytest.mark.parametrize("source", [dict(), dict(q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1)])
def test_deepseek_v3_conversion_reproduces_logits_and_greedy_decoding(source):
    hf_model = _deepseek_v3(seed=23, **source)
    model = convert_hf_model(hf_model, router="graph", n_shared_heads=1, top_k_heads=2)
    cfg = model.config
    assert (cfg.attention, cfg.kv_lora_rank, cfg.n_dense_layers, cfg.expert_score) == ("mla", 16, 1, "sigmoid")
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(6))
    _assert_same_logits(hf_model, model, ids)
    prompt = ids[:1, :5]
    with torch.no_grad():
        reference = hf_model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.eval().generate(prompt, max_new_tokens=12, temperature=0.0), reference)


def test_config_that_does_not_fit_the_weights_names_a_tensor_in_one_line(tmp_path, capsys):
    _llama(seed=3).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["intermediate_size"] = 64  # the saved MLP is 48 wide
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"config.json does not fit the weights: model.layers.0.mlp.\w+.weight "
                                              r"is \[\d+, \d+\] in the safetensors but \[\d+, \d+\] by config.json"):
        convert_hf_model(tmp_path / "hf")
    assert "MISMATCH" not in capsys.readouterr().err  # transformers' load report stays quiet
