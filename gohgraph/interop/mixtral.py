"""Hugging Face ``MixtralForCausalLM`` -> GoHTransformer: Llama's attention, and ``ffn="moe"`` experts.

Mixtral's sparse block is softmax routing with renormalised top-k over SwiGLU experts, which is
what ``ffn="moe"`` computes (tests/moe/test_hf_blocks.py), so the experts, their router and their
count come from the source and are not upcycled. A sliding window is kept, as for Mistral.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from ..config import GoHConfig
from . import llama
from .source import LLAMA_STYLE_KEYS, SourceFamily, put_stacked_experts


def source_config(hf_config: Any) -> Dict[str, Any]:
    values = llama.mistral_source_config(hf_config)
    values.update(ffn="moe", n_experts=hf_config.num_local_experts, top_k_experts=hf_config.num_experts_per_tok,
                  expert_hidden=hf_config.intermediate_size, expert_activation="swiglu")
    return values


def weights(hf_model: nn.Module, cfg: GoHConfig) -> Dict[str, torch.Tensor]:
    """GoH state-dict entries from a ``MixtralForCausalLM``: Llama's, with its sparse blocks' experts."""
    state = llama.embeddings_and_attention(hf_model, cfg)
    for i, layer in enumerate(hf_model.model.layers):
        put_stacked_experts(state, f"blocks.{i}.ffn.", layer.mlp)
    return state


MIXTRAL = SourceFamily(hf_class="MixtralForCausalLM", source_config=source_config, weights=weights,
                       config_keys=(*LLAMA_STYLE_KEYS, "num_local_experts"))
