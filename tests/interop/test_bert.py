"""Hugging Face BERT (masked LM, sequence classification) -> GoHEncoder.

The reference is the Hugging Face model itself, built tiny and random here: the converted encoder
must give its logits at every real (non-padded) position to 1e-4, through every save/load path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gohgraph import GoHEncoder, from_pretrained
from gohgraph.cli.main import main as cli_main
from gohgraph.data.objectives.mlm import mask_tokens
from gohgraph.interop.convert import convert_hf_model, load_hf_model
from gohgraph.interop.source import ConversionError
from gohgraph.training.schedules import dense_to_sparse_schedule

transformers = pytest.importorskip("transformers", reason="the optional hf extra (transformers) is not installed")

VOCAB, SEQ = 120, 14


def _randomised(hf_model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights of visible size (norm gains around 1, biases nonzero) so every copied tensor matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_gain = param.dim() == 1 and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_gain else 0.15 * noise)
    return hf_model.eval()


def _bert(head: str = "BertForMaskedLM", seed: int = 0, **overrides):
    values = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=40, type_vocab_size=2, num_labels=3)
    values.update(overrides)
    torch.manual_seed(seed)
    return _randomised(getattr(transformers, head)(transformers.BertConfig(**values)), seed)


def _padded_batch(seed: int):
    """Two rows, the second right-padded after 9 tokens (pad id 0 in the ids, 0 in the mask)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=generator)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, 9:] = 0
    ids[1, 9:] = 0
    return ids, mask


def _assert_same_mlm_logits(hf_model, model, ids, mask):
    with torch.no_grad():
        reference = hf_model(input_ids=ids, attention_mask=mask).logits
        converted = model.eval()(ids, mask).logits
    real = mask.bool()
    assert reference.abs().max() > 1.0  # logits large enough for 1e-4 to be a strict tolerance
    torch.testing.assert_close(converted[real], reference[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("source, routing", [
    (dict(), dict(router="graph", n_shared_heads=1, top_k_heads=2)),
    (dict(tie_word_embeddings=False, layer_norm_eps=1e-7), dict(router="linear", top_k_heads=2)),
    (dict(), dict(router="dense")),
])
def test_masked_lm_conversion_reproduces_logits_at_real_positions(source, routing):
    hf_model = _bert(**source)
    model = convert_hf_model(hf_model, **routing)
    assert isinstance(model, GoHEncoder)
    cfg = model.config
    assert (cfg.model_type, cfg.norm_position, cfg.mlp, cfg.embedding_norm, cfg.mlm_transform) == (
        "encoder", "post", "gelu-exact", True, True)
    assert cfg.norm_eps == source.get("layer_norm_eps", 1e-12)
    ids, mask = _padded_batch(1)
    _assert_same_mlm_logits(hf_model, model, ids, mask)
    if routing["router"] != "dense":
        model.set_dense_blend(0.0)  # the configured top-k routing now changes the function
        with torch.no_grad():
            assert (model(ids, mask).logits - hf_model(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-2


def test_sequence_classification_conversion_reproduces_class_logits():
    hf_model = _bert("BertForSequenceClassification", seed=2)
    model = convert_hf_model(hf_model, router="graph", n_shared_heads=1, top_k_heads=1)
    assert (model.config.n_labels, model.config.classifier_pooling) == (3, "first-tanh")
    ids, mask = _padded_batch(3)
    with torch.no_grad():
        reference = hf_model(input_ids=ids, attention_mask=mask).logits
        converted = model.eval()(ids, mask).class_logits
    assert reference.abs().max() > 0.5
    torch.testing.assert_close(converted, reference, atol=1e-4, rtol=0)


def test_token_type_zero_is_folded_into_the_positions():
    """BERT's type-0 embedding is part of the converted positions: with it zeroed in the source,
    the converted position table is the source's own."""
    hf_model = _bert(seed=4)
    model = convert_hf_model(hf_model)
    type_zero = hf_model.bert.embeddings.token_type_embeddings.weight[0]
    assert type_zero.abs().max() > 0.1
    torch.testing.assert_close(model.encoder.position_embed.weight.detach(),
                               (hf_model.bert.embeddings.position_embeddings.weight + type_zero).detach())


def test_sharded_classifier_directory_loads_its_own_class_and_reloads(tmp_path):
    hf_model = _bert("BertForSequenceClassification", seed=5)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="40KB", safe_serialization=True)
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    assert type(load_hf_model(tmp_path / "hf")).__name__ == "BertForSequenceClassification"
    model = convert_hf_model(tmp_path / "hf", top_k_heads=2)
    reloaded = from_pretrained(model.save_pretrained(tmp_path / "goh"))
    assert isinstance(reloaded, GoHEncoder)
    ids, mask = _padded_batch(6)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids, mask).class_logits,
                                   hf_model(input_ids=ids, attention_mask=mask).logits, atol=1e-4, rtol=0)


def test_cli_converts_a_masked_lm_with_routed_heads(tmp_path, capsys):
    hf_model = _bert(seed=7)
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    code = cli_main(["convert", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "goh"),
                     "--router", "graph", "--n-shared-heads", "1", "--top-k-heads", "2"])
    assert code == 0 and "active heads 3/4" in capsys.readouterr().out
    model = from_pretrained(tmp_path / "goh")
    assert isinstance(model, GoHEncoder)
    assert (model.config.router, model.config.n_shared_heads, model.config.top_k_heads) == ("graph", 1, 2)
    _assert_same_mlm_logits(hf_model, model, *_padded_batch(8))
    # the causal-LM trainer refuses it in one line rather than building a decoder from its config
    assert cli_main(["train", "--init-from", str(tmp_path / "goh"), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert "model_type='encoder'" in err and "\n" not in err


def test_conversion_rejects_what_it_cannot_reproduce(tmp_path):
    with pytest.raises(ConversionError, match="hidden_act='relu'"):
        convert_hf_model(_bert(hidden_act="relu"))
    with pytest.raises(ConversionError, match="problem_type='regression'"):
        convert_hf_model(_bert("BertForSequenceClassification", problem_type="regression", num_labels=1))
    with pytest.raises(ConversionError, match="cannot convert BertModel"):
        convert_hf_model(_bert("BertModel"))
    with pytest.raises(ConversionError, match=r"cannot override \['norm_position'\]"):
        convert_hf_model(_bert(), norm_position="pre")
    hf_model = _bert(seed=9)
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    values = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**values, "architectures": ["BertForPreTraining"]}))
    with pytest.raises(ConversionError, match=r"BertForPreTraining.*bert \(BertForMaskedLM, "
                                              r"BertForSequenceClassification\)"):
        convert_hf_model(tmp_path / "hf")


def test_converted_masked_lm_trains_with_annealed_top_k_heads():
    """Dense -> top-k over a short warm-up (as for Llama), then sparse MLM training lowers the loss."""
    model = convert_hf_model(_bert(seed=10), router="graph", n_shared_heads=1, top_k_heads=1).train()
    text = Path(json.__file__).read_bytes()[:8 * 24]
    tokens = torch.tensor([1 + byte % (VOCAB - 2) for byte in text], dtype=torch.long).view(8, 24)
    generator = torch.Generator().manual_seed(0)
    inputs, labels = mask_tokens(tokens, mask_id=VOCAB - 1, n_random=VOCAB - 1, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    warmup, losses = 6, []
    for step in range(24):
        model.set_dense_blend(dense_to_sparse_schedule(step, warmup))
        out = model(inputs, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.mlm_loss.item())
    gates = model(inputs).routing[0].head_gates
    assert torch.equal((gates == 0).sum(-1), torch.full((8, 24), 2))  # sparse: 2 of 4 heads off
    assert losses[-1] < 0.75 * losses[warmup]
