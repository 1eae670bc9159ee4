"""Hugging Face ``T5ForConditionalGeneration`` -> GoHSeq2Seq (docs/conversion.md).

What T5 fixes in the target: RMSNorm without mean subtraction or bias (``T5LayerNorm``), pre-norm
blocks, no biases anywhere, unscaled attention scores (``attention_scale="none"``; T5's init
folds ``1/sqrt(d_kv)`` into ``W_q``), a bucketed relative-position bias per stack held by its first
layer and shared by the others (``position_embedding="t5-relative"``; none in cross-attention), one
embedding shared by encoder, decoder and (v1.0) the output head, with the decoder output scaled
by ``d_model**-0.5`` before that head. v1.0's FFN is ``W_o ReLU(W_i x)``; v1.1's ``"gated-gelu"``
is ``W_o (gelu_new(W_i0 x) * W_i1 x)`` (GeGLU) with an untied ``lm_head``.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from ..config import GoHConfig
from .source import ConversionError, SourceFamily, put_linear

# T5Config.feed_forward_proj -> GoHConfig.mlp ("gated-gelu" means gelu_new, the tanh form; a plain
# "gelu" is Hugging Face's exact erf GELU)
FEED_FORWARD_KINDS = {"relu": "relu", "gated-gelu": "geglu", "gelu": "gelu-exact", "gated-silu": "swiglu"}
DEFAULT_MAX_SEQ_LEN = 512  # T5 has no position table; its n_positions, where a config has one


def source_config(hf_config: Any) -> Dict[str, Any]:
    d_model, n_heads, d_kv = hf_config.d_model, hf_config.num_heads, hf_config.d_kv
    if n_heads * d_kv != d_model:
        raise ConversionError(f"T5 num_heads={n_heads} x d_kv={d_kv} != d_model={d_model}; GoH needs "
                              "head_dim = d_model / num_heads")
    if hf_config.feed_forward_proj not in FEED_FORWARD_KINDS:
        raise ConversionError(f"T5 feed_forward_proj={hf_config.feed_forward_proj!r} is not supported; "
                              f"supported: {sorted(FEED_FORWARD_KINDS)}")
    # transformers >= 5 reads v1.0's output scaling into scale_decoder_outputs; 4.x took it from
    # tie_word_embeddings (True for v1.0, False for v1.1)
    scale = getattr(hf_config, "scale_decoder_outputs", None)
    if scale is None:
        scale = getattr(hf_config, "tie_word_embeddings", True)
    return dict(
        model_type="seq2seq", vocab_size=hf_config.vocab_size, d_model=d_model, n_heads=n_heads,
        n_layers=hf_config.num_layers, n_decoder_layers=hf_config.num_decoder_layers or hf_config.num_layers,
        max_seq_len=int(getattr(hf_config, "n_positions", None) or DEFAULT_MAX_SEQ_LEN),
        norm="rms", norm_eps=hf_config.layer_norm_epsilon, norm_position="pre", ffn_hidden=hf_config.d_ff,
        mlp=FEED_FORWARD_KINDS[hf_config.feed_forward_proj], linear_bias=False,
        position_embedding="t5-relative", attention_scale="none",
        relative_buckets=hf_config.relative_attention_num_buckets,
        relative_max_distance=hf_config.relative_attention_max_distance,
        scale_decoder_output=bool(scale),
        decoder_start_token_id=int(hf_config.decoder_start_token_id), pad_token_id=int(hf_config.pad_token_id),
        init_std=0.02,
    )


def weights(hf_model: nn.Module, cfg: GoHConfig) -> Dict[str, torch.Tensor]:
    """GoH state-dict entries from a ``T5ForConditionalGeneration``: per block q/k/v stacked into
    ``qkv``, the relative bias of each stack's first layer as the stack's bias table. The output
    head is tied when the source's ``lm_head`` is its embedding, else copied."""
    state = {"embed.weight": hf_model.shared.weight}
    for stack_name, stack in (("encoder", hf_model.encoder), ("decoder", hf_model.decoder)):
        prefix = f"{stack_name}."
        first = stack.block[0].layer[0].SelfAttention
        state[prefix + "relative_bias.weight"] = first.relative_attention_bias.weight  # [buckets, heads]
        state[prefix + "final_norm.weight"] = stack.final_layer_norm.weight
        for i, block in enumerate(stack.block):
            layers, name = block.layer, f"{prefix}blocks.{i}."
            _put_attention(state, name + "attn", cfg, layers[0].SelfAttention)
            state[name + "attn_norm.weight"] = layers[0].layer_norm.weight
            if stack_name == "decoder":
                _put_attention(state, name + "cross_attn", cfg, layers[1].EncDecAttention)
                state[name + "cross_norm.weight"] = layers[1].layer_norm.weight
            state[name + "ffn_norm.weight"] = layers[-1].layer_norm.weight
            _put_feed_forward(state, name + "ffn.mlp", cfg, layers[-1].DenseReluDense)
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = hf_model.lm_head.weight
    return state


def model_fields(hf_model: nn.Module) -> Dict[str, Any]:
    """``tie_embeddings``: whether the source's output head is its embedding (the same tensor).
    The config cannot say: transformers >= 5 ties every T5's head, whatever ``tie_word_embeddings``
    a v1.1 config.json holds, while 4.x keeps v1.1's own ``lm_head``."""
    return {"tie_embeddings": hf_model.lm_head.weight.data_ptr() == hf_model.shared.weight.data_ptr()}


def _put_attention(state: Dict[str, torch.Tensor], name: str, cfg: GoHConfig, attention: nn.Module) -> None:
    put_linear(state, name + ".qkv", cfg, attention.q, attention.k, attention.v)
    put_linear(state, name + ".out", cfg, attention.o)


def _put_feed_forward(state: Dict[str, torch.Tensor], name: str, cfg: GoHConfig, mlp: nn.Module) -> None:
    if cfg.mlp in ("geglu", "swiglu"):  # gated: act(wi_0 x) * wi_1 x, SwiGLU's gate rows first
        put_linear(state, name + ".gate_up", cfg, mlp.wi_0, mlp.wi_1)
        put_linear(state, name + ".down", cfg, mlp.wo)
    else:
        put_linear(state, name + ".fc", cfg, mlp.wi)
        put_linear(state, name + ".proj", cfg, mlp.wo)


T5 = SourceFamily(hf_class="T5ForConditionalGeneration", source_config=source_config, weights=weights,
                  model_fields=model_fields,
                  config_keys=("vocab_size", "d_model|hidden_size", "d_kv", "d_ff", "num_layers|num_hidden_layers",
                               "num_heads|num_attention_heads"))
