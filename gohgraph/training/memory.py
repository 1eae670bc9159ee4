"""How much memory a training step will need, checked before anything is allocated.

A request such as ``--set seq_len=100000`` must end in a one-line refusal, not in the kernel killing
the process (or the machine swapping for an hour). The estimate is deliberately simple and on the
generous side: exact parameter counts (the model is built on PyTorch's ``meta`` device, which
allocates nothing), 16 bytes per parameter for float32 weights, gradients and AdamW's two moments,
and activations per token and layer from the shapes that autograd saves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import GoHConfig
from .config import TrainConfig

BYTES_PER_FLOAT = 4
TRAINING_BYTES_PER_PARAMETER = 16  # float32 weight, gradient, AdamW exp_avg and exp_avg_sq
# float32 values saved per token and layer besides the FFN's: norms, q/k/v before and after RoPE,
# attention output, output projection input, residuals (measured with saved_tensors_hooks: 14-16)
ATTENTION_FLOATS_PER_D_MODEL = 16
FFN_FLOATS_PER_HIDDEN = 5  # gate/up (2h), SiLU and product (2h), down-projection input (h)
LOGIT_COPIES = 3  # logits, their float32 copy in the loss, and its gradient
SAFETY_MARGIN = 1.2


@dataclass
class StepMemory:
    """Bytes of one training step: ``state`` (weights, gradients, AdamW) and ``activations``."""

    parameters: int
    state: int
    activations: int

    @property
    def total(self) -> int:
        return int(SAFETY_MARGIN * (self.state + self.activations))


def estimate_step_memory(model_config: GoHConfig, train_config: TrainConfig,
                         build_model: Callable[[GoHConfig], torch.nn.Module], world_size: int = 1) -> StepMemory:
    """The memory one process needs for a step of ``train_config`` on ``build_model(model_config)``.

    A seq2seq model's decoder layers hold two attentions (self and cross) and an FFN each, over
    targets of up to ``seq_len`` tokens, beside the encoder's ``n_layers`` over the sources.
    """
    with torch.device("meta"):
        parameters = sum(p.numel() for p in build_model(model_config).parameters())
    cfg = model_config
    tokens = max(1, train_config.batch_size // world_size) * train_config.seq_len
    attention = ATTENTION_FLOATS_PER_D_MODEL * cfg.d_model
    if cfg.router == "graph":  # node features per round, edge attention and the head-mixing matrix
        attention += cfg.n_heads * cfg.router_dim * (4 * cfg.router_rounds + 2) + 3 * cfg.n_heads ** 2
    ffn = FFN_FLOATS_PER_HIDDEN * cfg.hidden_dim
    attention_layers, per_token = cfg.n_layers, cfg.n_layers * (attention + ffn)
    if cfg.is_encoder_decoder:
        attention_layers += 2 * cfg.decoder_layers
        per_token += cfg.decoder_layers * (2 * attention + ffn)
    activations = BYTES_PER_FLOAT * tokens * (per_token + LOGIT_COPIES * cfg.vocab_size)
    if cfg.dropout > 0:  # attention dropout takes SDPA's math path, which keeps the [seq, seq] scores
        batch = max(1, train_config.batch_size // world_size)
        activations += BYTES_PER_FLOAT * 2 * batch * cfg.n_heads * train_config.seq_len ** 2 * attention_layers
    return StepMemory(parameters=parameters, state=TRAINING_BYTES_PER_PARAMETER * parameters,
                      activations=activations)


def available_memory(device: torch.device) -> int:
    """Bytes free for this process on ``device``: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_step_fits(memory: StepMemory, available: int, train_config: TrainConfig, model_config: GoHConfig) -> None:
    """Refuse, in one line naming the estimate and what to change, a step that cannot fit."""
    if memory.total <= available:
        return
    gb = 2 ** 30
    raise ValueError(
        f"a training step needs about {memory.total / gb:.1f} GiB ({memory.parameters:,} parameters: "
        f"{memory.state / gb:.1f} GiB of weights, gradients and AdamW state; activations "
        f"{memory.activations / gb:.1f} GiB for batch_size={train_config.batch_size} x "
        f"seq_len={train_config.seq_len}) but {available / gb:.1f} GiB are available; lower batch_size, "
        f"seq_len, d_model={model_config.d_model} or n_layers={model_config.n_layers} "
        "(or pass --force to try anyway)")
