"""Hugging Face ``BertForMaskedLM`` and ``BertForSequenceClassification`` -> :class:`~gohgraph.GoHEncoder`.

BERT (Devlin et al. 2019) is the encoder of docs/encoder.md with these values: post-norm blocks
``LN(x + f(x))``, LayerNorm with BERT's ``layer_norm_eps`` (1e-12), learned absolute positions, a
LayerNorm after the embeddings, exact (erf) GELU MLP, biases on every projection. Its MLM head is
``W_E^T LN(GELU(W h + b)) + b_vocab`` (``mlm_transform``, tied to the embedding); its classifier
reads the pooler ``tanh(W h_0 + b)`` (``classifier_pooling="first-tanh"``).

Token types: BERT adds ``token_type_embeddings[type_id]`` to every embedding. GoH models take no
segment ids, so the type-0 row is folded into the learned position table
(``position'_p = position_p + type_0``): exact for inputs whose token types are all 0 (single
segments, the default of ``BertTokenizer`` for one text); a sentence pair's second segment loses
its type-1 offset, so a model fine-tuned on pairs computes something else for them.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from ..config import GoHConfig
from .source import LLAMA_STYLE_KEYS, ConversionError, SourceFamily, put_linear

# problem types whose logits a cross-entropy classifier reads as BERT does
CLASSIFICATION_PROBLEMS = (None, "single_label_classification")


def source_config(hf_config: Any) -> Dict[str, Any]:
    """GoHConfig fields of a BERT checkpoint with its masked-LM head (no classifier)."""
    if hf_config.hidden_act != "gelu":
        raise ConversionError(f"BERT hidden_act={hf_config.hidden_act!r} is not supported; supported: 'gelu' (exact)")
    position_type = getattr(hf_config, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ConversionError(f"BERT position_embedding_type={position_type!r} is not supported; supported: 'absolute'")
    if getattr(hf_config, "is_decoder", False) or getattr(hf_config, "add_cross_attention", False):
        raise ConversionError("BERT with is_decoder=True or add_cross_attention=True is not supported "
                              "(bidirectional encoders only)")
    if hf_config.hidden_size % hf_config.num_attention_heads:
        raise ConversionError(f"BERT hidden_size={hf_config.hidden_size} is not divisible by "
                              f"num_attention_heads={hf_config.num_attention_heads}")
    return dict(
        model_type="encoder", vocab_size=hf_config.vocab_size, d_model=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers, n_heads=hf_config.num_attention_heads, n_kv_heads=None,
        max_seq_len=hf_config.max_position_embeddings, norm="layer", norm_eps=hf_config.layer_norm_eps,
        norm_position="post", embedding_norm=True, ffn_hidden=hf_config.intermediate_size, mlp="gelu-exact",
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)), position_embedding="learned",
        linear_bias=True, mlm_transform=True, init_std=hf_config.initializer_range,
    )


def classifier_source_config(hf_config: Any) -> Dict[str, Any]:
    """GoHConfig fields of a BERT checkpoint with BERT's pooler and a ``num_labels``-way classifier."""
    problem = getattr(hf_config, "problem_type", None)
    if problem not in CLASSIFICATION_PROBLEMS or hf_config.num_labels < 2:
        raise ConversionError(f"BertForSequenceClassification with problem_type={problem!r}, num_labels="
                              f"{hf_config.num_labels} is not supported; supported: single-label classification "
                              "with num_labels >= 2 (GoHEncoder's classifier is trained with cross-entropy)")
    # the checkpoint has no MLM head: the GoH model keeps a tied one (no transform, zero vocabulary bias)
    return {**source_config(hf_config), "mlm_transform": False, "tie_embeddings": True,
            "n_labels": hf_config.num_labels, "classifier_pooling": "first-tanh"}


def _encoder_weights(bert: nn.Module, cfg: GoHConfig) -> Dict[str, torch.Tensor]:
    """Embeddings and blocks of a ``BertModel`` as GoHEncoder state-dict entries."""
    embeddings = bert.embeddings
    type_zero = embeddings.token_type_embeddings.weight[0]  # folded into the positions (module docstring)
    state = {"embed.weight": embeddings.word_embeddings.weight,
             "encoder.position_embed.weight": embeddings.position_embeddings.weight[:cfg.max_seq_len] + type_zero,
             "encoder.embedding_norm.weight": embeddings.LayerNorm.weight,
             "encoder.embedding_norm.bias": embeddings.LayerNorm.bias}
    for i, layer in enumerate(bert.encoder.layer):
        prefix = f"encoder.blocks.{i}."
        attention = layer.attention
        put_linear(state, prefix + "attn.qkv", cfg, attention.self.query, attention.self.key, attention.self.value)
        put_linear(state, prefix + "attn.out", cfg, attention.output.dense)
        put_linear(state, prefix + "ffn.mlp.fc", cfg, layer.intermediate.dense)
        put_linear(state, prefix + "ffn.mlp.proj", cfg, layer.output.dense)
        # post-norm: attn_norm is the LayerNorm after the attention residual, ffn_norm after the FFN's
        for goh_norm, hf_norm in (("attn_norm", attention.output.LayerNorm), ("ffn_norm", layer.output.LayerNorm)):
            state[f"{prefix}{goh_norm}.weight"], state[f"{prefix}{goh_norm}.bias"] = hf_norm.weight, hf_norm.bias
    return state


def weights(hf_model: nn.Module, cfg: GoHConfig) -> Dict[str, torch.Tensor]:
    """GoHEncoder state-dict entries from a ``BertForMaskedLM``: BERT's MLM transform is
    ``mlm_transform.0`` (dense), ``.2`` (LayerNorm); its vocabulary bias is ``lm_bias``."""
    state = _encoder_weights(hf_model.bert, cfg)
    predictions = hf_model.cls.predictions
    transform = predictions.transform
    state.update({"mlm_transform.0.weight": transform.dense.weight, "mlm_transform.0.bias": transform.dense.bias,
                  "mlm_transform.2.weight": transform.LayerNorm.weight, "mlm_transform.2.bias": transform.LayerNorm.bias,
                  # the bias the decoder adds (tied to ``predictions.bias`` only when the embeddings are)
                  "lm_bias": predictions.decoder.bias})
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = predictions.decoder.weight
    return state


def classifier_weights(hf_model: nn.Module, cfg: GoHConfig) -> Dict[str, torch.Tensor]:
    """GoHEncoder state-dict entries from a ``BertForSequenceClassification``: pooler and classifier."""
    bert = hf_model.bert
    if bert.pooler is None:
        raise ConversionError("BertForSequenceClassification without a pooler cannot be converted "
                              "(classifier_pooling='first-tanh' needs BERT's pooler weights)")
    state = _encoder_weights(bert, cfg)
    state.update({"pooler.weight": bert.pooler.dense.weight, "pooler.bias": bert.pooler.dense.bias,
                  "classifier.weight": hf_model.classifier.weight, "classifier.bias": hf_model.classifier.bias,
                  "lm_bias": torch.zeros(cfg.vocab_size)})
    return state


BERT_KEYS = (*LLAMA_STYLE_KEYS, "max_position_embeddings")
BERT_MLM = SourceFamily(hf_class="BertForMaskedLM", source_config=source_config, weights=weights, config_keys=BERT_KEYS)
BERT_CLASSIFIER = SourceFamily(hf_class="BertForSequenceClassification", source_config=classifier_source_config,
                               weights=classifier_weights, config_keys=BERT_KEYS)
