"""Hugging Face ``LlamaForCausalLM`` (with Llama-3.1's ``rope_scaling``) and
``MistralForCausalLM`` (sliding window) -> GoHTransformer: RoPE, RMSNorm, SwiGLU, GQA."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from ..config import GoHConfig
from .source import LLAMA_STYLE_KEYS, ConversionError, SourceFamily, put_linear


def source_config(hf_config: Any) -> Dict[str, Any]:
    d_model, n_heads = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or d_model // n_heads
    if head_dim * n_heads != d_model:
        raise ConversionError(f"Llama head_dim={head_dim} x num_attention_heads={n_heads} != hidden_size="
                              f"{d_model}; GoH needs head_dim = hidden_size / num_attention_heads")
    if hf_config.hidden_act != "silu":
        raise ConversionError(f"Llama hidden_act={hf_config.hidden_act!r} is not supported; supported: 'silu'")
    rope = hf_rope_parameters(hf_config)
    n_kv_heads = getattr(hf_config, "num_key_value_heads", None) or n_heads
    return dict(
        vocab_size=hf_config.vocab_size, d_model=d_model, n_layers=hf_config.num_hidden_layers,
        n_heads=n_heads, n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads,
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        norm="rms", norm_eps=hf_config.rms_norm_eps, ffn_hidden=hf_config.intermediate_size,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        position_embedding="rope", mlp="swiglu",
        linear_bias=bool(getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False)),
        init_std=hf_config.initializer_range,
        **rope_scaling_fields(rope),
    )


# Hugging Face rope_type -> GoHConfig.rope_scaling; "dynamic" (NTK recomputed from each sequence's
# length) and "yarn" have no equivalent here and are refused
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}


def hf_rope_parameters(hf_config: Any) -> Dict[str, Any]:
    """RoPE theta and scaling of a Hugging Face config: transformers >= 5 keeps them in
    ``rope_parameters``, 4.x in ``rope_theta`` / ``rope_scaling``."""
    return {**(getattr(hf_config, "rope_scaling", None) or {}), **(getattr(hf_config, "rope_parameters", None) or {})}


def rope_scaling_fields(rope: Dict[str, Any]) -> Dict[str, Any]:
    """GoHConfig RoPE-scaling fields from Hugging Face's ``rope_parameters`` / ``rope_scaling``."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConversionError(f"rope_type={rope_type!r} (RoPE scaling) is not supported; supported: {list(ROPE_TYPES)}")
    if rope_type == "default":
        return {}
    fields = dict(rope_scaling=ROPE_TYPES[rope_type], rope_scaling_factor=float(rope["factor"]))
    if rope_type == "llama3":
        fields.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]),
                      rope_original_max_seq_len=int(rope["original_max_position_embeddings"]))
    return fields


def weights(hf_model: nn.Module, cfg: GoHConfig) -> Dict[str, torch.Tensor]:
    """GoH state-dict entries (dense FFN) from a ``LlamaForCausalLM``: q/k/v stacked into ``qkv``."""
    state = embeddings_and_attention(hf_model, cfg)
    for i, layer in enumerate(hf_model.model.layers):
        put_linear(state, f"blocks.{i}.ffn.mlp.gate_up", cfg, layer.mlp.gate_proj, layer.mlp.up_proj)
        put_linear(state, f"blocks.{i}.ffn.mlp.down", cfg, layer.mlp.down_proj)
    return state


def embeddings_and_attention(hf_model: nn.Module, cfg: GoHConfig) -> Dict[str, torch.Tensor]:
    """Everything of a Llama-style decoder but its FFNs: embeddings, norms, attention, output head
    (also Mixtral's, whose blocks differ from Llama's only in the FFN)."""
    decoder = hf_model.model
    state = {"embed.weight": decoder.embed_tokens.weight, "final_norm.weight": decoder.norm.weight}
    for i, layer in enumerate(decoder.layers):
        attn, prefix = layer.self_attn, f"blocks.{i}."
        state[prefix + "attn_norm.weight"] = layer.input_layernorm.weight
        state[prefix + "ffn_norm.weight"] = layer.post_attention_layernorm.weight
        put_linear(state, prefix + "attn.qkv", cfg, attn.q_proj, attn.k_proj, attn.v_proj)
        put_linear(state, prefix + "attn.out", cfg, attn.o_proj)
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = hf_model.lm_head.weight
    return state


LLAMA = SourceFamily(hf_class="LlamaForCausalLM", source_config=source_config, weights=weights,
                     config_keys=LLAMA_STYLE_KEYS)


def mistral_source_config(hf_config: Any) -> Dict[str, Any]:
    """Mistral is Llama's block with a sliding window over the last ``sliding_window`` positions."""
    values = source_config(hf_config)
    window = getattr(hf_config, "sliding_window", None)
    if window is not None and window < hf_config.max_position_embeddings:
        values["sliding_window"] = int(window)
    return values


MISTRAL = SourceFamily(hf_class="MistralForCausalLM", source_config=mistral_source_config, weights=weights,
                       config_keys=LLAMA_STYLE_KEYS)
