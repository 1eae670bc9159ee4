"""What every Hugging Face source family provides, and the error all conversions raise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..config import GoHConfig


class ConversionError(ValueError):
    """A source checkpoint is missing, unsupported, or cannot be mapped onto a GoH model."""


@dataclass(frozen=True)
class SourceFamily:
    """One convertible Hugging Face family (one module of :mod:`gohgraph.interop` each).

    ``hf_class``: the ``transformers`` class whose weights are mapped; ``source_config(hf_config)``:
    the GoHConfig fields the pretrained weights fix (``model_type`` among them picks the GoH class;
    decoder-only without it); ``weights(hf_model, cfg)``: GoH state-dict entries (dense FFN)
    holding every pretrained tensor; ``model_fields(hf_model)``: fields only the loaded model
    tells (T5: whether its ``lm_head`` is the embedding), or ``None``. ``config_keys``: the sizes
    ``config.json`` must state (``"n_embd|hidden_size"`` accepts either name); a missing one would
    be filled by ``transformers``' default (a 4096-wide model) and fail on the weights.
    """

    hf_class: str
    source_config: Callable[[Any], Dict[str, Any]]
    weights: Callable[[nn.Module, GoHConfig], Dict[str, torch.Tensor]]
    model_fields: Optional[Callable[[nn.Module], Dict[str, Any]]] = None
    config_keys: Tuple[str, ...] = ()


# the sizes of a Llama-style config.json (Llama, Mistral, Mixtral, Qwen2-MoE, DeepSeek-V3, BERT)
LLAMA_STYLE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def put_linear(state: Dict[str, torch.Tensor], name: str, cfg: GoHConfig, *linears: nn.Linear) -> None:
    """Stack the rows of ``linears`` into one GoH linear; a source without bias gets a zero bias."""
    state[name + ".weight"] = torch.cat([linear.weight for linear in linears], dim=0)
    if cfg.linear_bias:
        state[name + ".bias"] = torch.cat([
            linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
            for linear in linears])


def put_stacked_experts(state: Dict[str, torch.Tensor], prefix: str, moe: nn.Module) -> None:
    """A Hugging Face sparse block's router and stacked experts (``gate_up_proj [E, 2h, d]``, gate
    rows first; ``down_proj [E, d, h]``) as GoH's ``router.proj`` and ``experts.w_in [E, d, 2h]`` /
    ``experts.w_out [E, h, d]`` under ``prefix`` (Mixtral's and Qwen2-MoE's layout alike)."""
    state[prefix + "router.proj.weight"] = moe.gate.weight
    state[prefix + "experts.w_in"] = moe.experts.gate_up_proj.transpose(1, 2)
    state[prefix + "experts.w_out"] = moe.experts.down_proj.transpose(1, 2)
