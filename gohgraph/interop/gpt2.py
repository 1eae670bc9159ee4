"""Hugging Face ``GPT2LMHeadModel`` -> GoHTransformer: learned positions, LayerNorm, GELU MLP, biases."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from ..config import GoHConfig
from .source import ConversionError, SourceFamily


def source_config(hf_config: Any) -> Dict[str, Any]:
    if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConversionError(f"GPT-2 activation_function={hf_config.activation_function!r} is not supported; "
                              "supported: 'gelu_new', 'gelu_pytorch_tanh'")
    if not hf_config.scale_attn_weights or hf_config.scale_attn_by_inverse_layer_idx:
        raise ConversionError("GPT-2 attention must use scale_attn_weights=True and "
                              "scale_attn_by_inverse_layer_idx=False (plain 1/sqrt(head_dim) scaling)")
    if getattr(hf_config, "add_cross_attention", False):
        raise ConversionError("GPT-2 with add_cross_attention=True is not supported (decoder-only models only)")
    return dict(
        vocab_size=hf_config.vocab_size, d_model=hf_config.n_embd, n_layers=hf_config.n_layer,
        n_heads=hf_config.n_head, n_kv_heads=None, max_seq_len=hf_config.n_positions,
        norm="layer", norm_eps=hf_config.layer_norm_epsilon,
        ffn_hidden=hf_config.n_inner or 4 * hf_config.n_embd,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
        position_embedding="learned", mlp="gelu", linear_bias=True, init_std=hf_config.initializer_range,
    )


def weights(hf_model: nn.Module, cfg: GoHConfig) -> Dict[str, torch.Tensor]:
    """GoH state-dict entries from a ``GPT2LMHeadModel``.

    GPT-2's ``Conv1D`` stores ``[in, out]`` weights (transposed to ``nn.Linear``'s ``[out, in]``);
    its ``c_attn`` output is already ``[q heads | k heads | v heads]``, GoH's fused layout.
    """
    body = hf_model.transformer
    state = {"embed.weight": body.wte.weight, "position_embed.weight": body.wpe.weight[:cfg.max_seq_len],
             "final_norm.weight": body.ln_f.weight, "final_norm.bias": body.ln_f.bias}
    for i, layer in enumerate(body.h):
        prefix = f"blocks.{i}."
        for goh_norm, hf_norm in (("attn_norm", layer.ln_1), ("ffn_norm", layer.ln_2)):
            state[f"{prefix}{goh_norm}.weight"], state[f"{prefix}{goh_norm}.bias"] = hf_norm.weight, hf_norm.bias
        for goh_name, conv in (("attn.qkv", layer.attn.c_attn), ("attn.out", layer.attn.c_proj),
                               ("ffn.mlp.fc", layer.mlp.c_fc), ("ffn.mlp.proj", layer.mlp.c_proj)):
            state[prefix + goh_name + ".weight"] = conv.weight.t()
            state[prefix + goh_name + ".bias"] = conv.bias
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = hf_model.lm_head.weight
    return state


GPT2 = SourceFamily(hf_class="GPT2LMHeadModel", source_config=source_config, weights=weights,
                    config_keys=("vocab_size", "n_embd|hidden_size", "n_layer|num_hidden_layers",
                                 "n_head|num_attention_heads", "n_positions|max_position_embeddings"))
