"""Normalisation layers chosen by ``cfg.norm``: RMSNorm (LLaMA) or LayerNorm (GPT-2, BERT)."""

from __future__ import annotations

from torch import nn

from ..config import GoHConfig


def build_norm(cfg: GoHConfig) -> nn.Module:
    """``[..., d_model] -> [..., d_model]`` normalised over the last dimension."""
    if cfg.norm == "rms":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
