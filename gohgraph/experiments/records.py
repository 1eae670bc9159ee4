"""What a comparison measured: per (variant, seed) runs, per-variant training cost, the whole table's data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..training.config import TrainConfig
from .variants import MatchedVariant


@dataclass
class SeedRun:
    """One trained (variant, seed): final validation loss (nats/token), its curve, routing balance."""

    variant: str
    seed: int
    val_loss: float
    val_history: List[Tuple[int, int, float]]  # (step, tokens_seen, val_loss)
    train_tokens_per_s: float
    head_load_cv: Optional[float] = None
    expert_load_cv: Optional[float] = None
    active_heads_per_token: Optional[float] = None
    scores: Dict[str, float] = field(default_factory=dict)  # the task's other final scores (e.g. accuracy)


@dataclass
class TrainingCost:
    """Throughput and memory of one training step (forward, backward, AdamW) of one variant.

    ``tokens_per_s``: median over interleaved repeats. ``activation_bytes``: bytes of the distinct
    tensors autograd saves for backward in one step (``saved_tensors_hooks``; parameters excluded).
    ``state_bytes``: weights, gradients and AdamW moments, 16 bytes per float32 parameter.
    The memory and the FLOPs are counted, not sampled, so they are the same on every run and machine.
    """

    tokens_per_s: float
    activation_bytes: int
    state_bytes: int
    # FLOPs counted by FlopCounterMode on the real step (gohgraph.analysis.flops): the training
    # step per token, and one cached decode step after a ``seq_len`` prompt per generated token
    train_flops_per_token: Optional[float] = None
    decode_flops_per_token: Optional[float] = None

    @property
    def memory_mb(self) -> float:
        return (self.activation_bytes + self.state_bytes) / 2 ** 20


@dataclass
class Comparison:
    """Everything :func:`run_comparison` measured; :func:`render_table` turns it into the table."""

    variants: Dict[str, MatchedVariant]
    runs: List[SeedRun]
    costs: Dict[str, TrainingCost]
    train_config: TrainConfig
    description: str = ""
    elapsed_s: float = 0.0
    task: str = "lm"  # the training task every variant was trained on (gohgraph.training.tasks)

    def runs_of(self, name: str) -> List[SeedRun]:
        return [run for run in self.runs if run.variant == name]
