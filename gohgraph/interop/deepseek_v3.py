"""Hugging Face ``DeepseekV3ForCausalLM`` -> GoHTransformer: MLA attention and DeepSeek-V3's experts.

Attention is ``attention="mla"`` (:mod:`gohgraph.layers.latent_attention`). DeepSeek stores the RoPE
dimensions of its query and shared key in interleaved pairs (``rope_interleave``); gohgraph rotates
halves, so those rows of ``q_proj`` / ``q_b_proj`` and ``kv_a_proj_with_mqa`` are reordered evens
first, then odds: the same permutation on queries and keys leaves every score unchanged. The FFN
is dense in the first ``first_k_dense_replace`` layers (``n_dense_layers``) and ``ffn="moe"`` after,
with DeepSeek-V3's routing (sigmoid scores, correction bias on the scores, group-limited top-k,
``routed_scaling_factor``; tests/moe/test_hf_blocks.py) and its ungated shared experts. YaRN RoPE
scaling is refused (its attention-scale correction is not implemented).
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from ..config import GoHConfig
from .llama import hf_rope_parameters, rope_scaling_fields
from .source import LLAMA_STYLE_KEYS, ConversionError, SourceFamily, put_stacked_experts


def source_config(hf_config: Any) -> Dict[str, Any]:
    if hf_config.hidden_act != "silu":
        raise ConversionError(f"DeepSeek-V3 hidden_act={hf_config.hidden_act!r} is not supported; supported: 'silu'")
    rope = hf_rope_parameters(hf_config)
    n_routed, n_shared = hf_config.n_routed_experts, hf_config.n_shared_experts or 0
    values = dict(
        vocab_size=hf_config.vocab_size, d_model=hf_config.hidden_size, n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads, max_seq_len=hf_config.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        norm="rms", norm_eps=hf_config.rms_norm_eps, ffn_hidden=hf_config.intermediate_size,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)), position_embedding="rope",
        mlp="swiglu", linear_bias=bool(getattr(hf_config, "attention_bias", False)),
        init_std=hf_config.initializer_range,
        attention="mla", kv_lora_rank=hf_config.kv_lora_rank, q_lora_rank=hf_config.q_lora_rank,
        qk_rope_head_dim=hf_config.qk_rope_head_dim, qk_nope_head_dim=hf_config.qk_nope_head_dim,
        v_head_dim=hf_config.v_head_dim,
        ffn="moe", n_dense_layers=min(hf_config.first_k_dense_replace, hf_config.num_hidden_layers - 1),
        n_experts=n_routed + (1 if n_shared else 0), n_shared_experts=1 if n_shared else 0,
        top_k_experts=hf_config.num_experts_per_tok, expert_hidden=hf_config.moe_intermediate_size,
        expert_activation="swiglu", expert_score="sigmoid", expert_renormalise=bool(hf_config.norm_topk_prob),
        n_expert_groups=hf_config.n_group, top_k_expert_groups=hf_config.topk_group,
        routed_scaling_factor=float(hf_config.routed_scaling_factor),
        **rope_scaling_fields(rope),
    )
    if n_shared:
        values["shared_expert_hidden"] = n_shared * hf_config.moe_intermediate_size
    if hf_config.first_k_dense_replace >= hf_config.num_hidden_layers:
        raise ConversionError(f"DeepSeek-V3 with first_k_dense_replace={hf_config.first_k_dense_replace} >= "
                              f"num_hidden_layers={hf_config.num_hidden_layers} has no MoE layer; supported: fewer")
    return values


def weights(hf_model: nn.Module, cfg: GoHConfig) -> Dict[str, torch.Tensor]:
    """GoH state-dict entries from a ``DeepseekV3ForCausalLM``."""
    decoder, interleaved = hf_model.model, bool(getattr(hf_model.config, "rope_interleave", False))
    state = {"embed.weight": decoder.embed_tokens.weight, "final_norm.weight": decoder.norm.weight}
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = hf_model.lm_head.weight
    for i, layer in enumerate(decoder.layers):
        prefix = f"blocks.{i}."
        state[prefix + "attn_norm.weight"] = layer.input_layernorm.weight
        state[prefix + "ffn_norm.weight"] = layer.post_attention_layernorm.weight
        _put_latent_attention(state, prefix + "attn.", layer.self_attn, cfg, interleaved)
        mlp, ffn = layer.mlp, prefix + "ffn."
        if i < cfg.n_dense_layers:
            state[ffn + "mlp.gate_up.weight"] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            state[ffn + "mlp.down.weight"] = mlp.down_proj.weight
            continue
        put_stacked_experts(state, ffn, mlp)
        state[ffn + "gate.selection_bias"] = mlp.gate.e_score_correction_bias
        if cfg.n_shared_experts:
            shared = mlp.shared_experts
            state[ffn + "shared_experts.w_in.weight"] = torch.cat([shared.gate_proj.weight, shared.up_proj.weight])
            state[ffn + "shared_experts.w_out.weight"] = shared.down_proj.weight
    return state


def _put_latent_attention(state: Dict[str, torch.Tensor], prefix: str, attn: nn.Module, cfg: GoHConfig,
                          interleaved: bool) -> None:
    rope, nope = cfg.qk_rope_head_dim, cfg.mla_nope_dim
    # evens then odds: DeepSeek's interleaved pairs laid out as the halves gohgraph's RoPE rotates
    order = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)]) if interleaved else torch.arange(rope)

    def queries(weight: torch.Tensor) -> torch.Tensor:  # [H (nope + rope), in]
        per_head = weight.view(cfg.n_heads, nope + rope, -1)
        return torch.cat([per_head[:, :nope], per_head[:, nope:][:, order]], dim=1).reshape(weight.shape)

    if attn.q_lora_rank is None:
        state[prefix + "q_proj.weight"] = queries(attn.q_proj.weight)
    else:
        state[prefix + "q_down.weight"] = attn.q_a_proj.weight
        if attn.q_a_proj.bias is not None:
            state[prefix + "q_down.bias"] = attn.q_a_proj.bias
        state[prefix + "q_norm.weight"] = attn.q_a_layernorm.weight
        state[prefix + "q_up.weight"] = queries(attn.q_b_proj.weight)
    rank = cfg.kv_lora_rank
    kv_order = torch.cat([torch.arange(rank), rank + order])
    state[prefix + "kv_down.weight"] = attn.kv_a_proj_with_mqa.weight[kv_order]
    if attn.kv_a_proj_with_mqa.bias is not None:
        state[prefix + "kv_down.bias"] = attn.kv_a_proj_with_mqa.bias[kv_order]
    state[prefix + "kv_norm.weight"] = attn.kv_a_layernorm.weight
    state[prefix + "kv_up.weight"] = attn.kv_b_proj.weight
    state[prefix + "out.weight"] = attn.o_proj.weight
    if attn.o_proj.bias is not None:
        state[prefix + "out.bias"] = attn.o_proj.bias


DEEPSEEK_V3 = SourceFamily(hf_class="DeepseekV3ForCausalLM", source_config=source_config, weights=weights,
                           config_keys=(*LLAMA_STYLE_KEYS, "n_routed_experts", "moe_intermediate_size"))
