"""Hugging Face ``Qwen2MoeForCausalLM`` -> GoHTransformer: Llama-style attention with q/k/v biases,
and ``ffn="moe"`` experts with Qwen2-MoE's weighting and its sigmoid-gated shared expert.

Qwen2-MoE routes with a softmax whose top-k values are renormalised only with
``norm_topk_prob`` (``expert_renormalise``), and adds one shared expert of its own width whose
output is gated by ``sigmoid(w^T x)`` (``shared_expert_hidden``, ``shared_expert_gate``);
tests/moe/test_hf_blocks.py checks the block. Sliding windows and dense layers between the sparse
ones (``mlp_only_layers``, ``decoder_sparse_step > 1``) are refused: every gohgraph layer has the
same FFN and attends to the whole context.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from ..config import GoHConfig
from . import llama
from .source import LLAMA_STYLE_KEYS, ConversionError, SourceFamily, put_stacked_experts


def source_config(hf_config: Any) -> Dict[str, Any]:
    if getattr(hf_config, "use_sliding_window", False):
        raise ConversionError("Qwen2-MoE with use_sliding_window=True is not supported (gohgraph attends to the "
                              "whole context)")
    if getattr(hf_config, "mlp_only_layers", None) or getattr(hf_config, "decoder_sparse_step", 1) != 1:
        raise ConversionError("Qwen2-MoE with dense layers between the sparse ones (mlp_only_layers, "
                              "decoder_sparse_step > 1) is not supported: every gohgraph layer has the same FFN")
    values = llama.source_config(hf_config)
    values.update(linear_bias=bool(hf_config.qkv_bias), ffn="moe", n_experts=hf_config.num_experts + 1,
                  n_shared_experts=1, top_k_experts=hf_config.num_experts_per_tok,
                  expert_hidden=hf_config.moe_intermediate_size, expert_activation="swiglu",
                  expert_renormalise=bool(hf_config.norm_topk_prob),
                  shared_expert_hidden=hf_config.shared_expert_intermediate_size, shared_expert_gate=True)
    return values


def weights(hf_model: nn.Module, cfg: GoHConfig) -> Dict[str, torch.Tensor]:
    """GoH state-dict entries from a ``Qwen2MoeForCausalLM`` (o_proj has no bias: it gets zeros)."""
    state = llama.embeddings_and_attention(hf_model, cfg)
    for i, layer in enumerate(hf_model.model.layers):
        moe, prefix = layer.mlp, f"blocks.{i}.ffn."
        put_stacked_experts(state, prefix, moe)
        shared = moe.shared_expert
        state[prefix + "shared_experts.w_in.weight"] = torch.cat([shared.gate_proj.weight, shared.up_proj.weight])
        state[prefix + "shared_experts.w_out.weight"] = shared.down_proj.weight
        state[prefix + "shared_experts.output_gate.weight"] = moe.shared_expert_gate.weight
    return state


QWEN2_MOE = SourceFamily(hf_class="Qwen2MoeForCausalLM", source_config=source_config, weights=weights,
                         config_keys=(*LLAMA_STYLE_KEYS, "num_experts", "moe_intermediate_size"))
