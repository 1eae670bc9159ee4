"""TrainConfig: the hyper-parameters of a training run, typed and checked like GoHConfig."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

from ..config import dataclass_from_dict, parse_fields

DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class TrainConfig:
    """Training hyper-parameters. ``batch_size`` counts sequences per micro-step over *all* ranks,
    so a run means the same thing on 1 or N processes; a step sees
    ``batch_size * grad_accum_steps * seq_len`` tokens."""

    batch_size: int = 16
    seq_len: int = 128
    grad_accum_steps: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = no clipping
    aux_warmup_steps: int = 0  # aux-loss coefficient ramps 0 -> 1 over these steps
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto = bf16 autocast on CUDA, float32 on CPU
    fsdp: bool = False
    # shard each MoE layer's routed experts over this many ranks (= the torchrun processes); 1 = off;
    # DDP or FSDP2 (fsdp=True) takes care of every other parameter
    expert_parallel: int = 1
    # shard every attention's heads and dense FFN's hidden units over this many ranks (= the torchrun
    # processes, which all read the same batch); 1 = off; no data parallel beside it
    tensor_parallel: int = 1
    tensorboard: bool = True
    # torch.compile the training forward (and its backward); eager where it cannot compile, with one
    # line saying why (gohgraph.training.compile)
    compile: bool = False
    # continue-training: start from a save_pretrained directory's weights (e.g. a converted dense
    # model) and anneal its heads from dense to top-k over dense_anneal_steps (MoH's continue-tuning)
    init_from: Optional[str] = None
    dense_anneal_steps: int = 0  # 0 = leave GoHTransformer's dense_blend as it is
    # Mixture-of-Recursions (expert-choice): capacities start at every token and reach the
    # configured ones along a half cosine over this many steps (0 = no warm-up)
    recursion_warmup_steps: int = 0

    def __post_init__(self) -> None:
        parse_fields(self, owner="TrainConfig.")
        for name in ("batch_size", "seq_len", "grad_accum_steps", "max_steps", "eval_every",
                     "eval_batches", "save_every", "keep_last", "log_every", "expert_parallel",
                     "tensor_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} must be a positive integer")
        for name in ("warmup_steps", "aux_warmup_steps", "seed", "dense_anneal_steps", "recursion_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} must be an integer >= 0")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr={self.lr} must be > 0")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 0")
        for name in ("min_lr_ratio", "beta1", "beta2"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be in [0, 1]")
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype={self.dtype!r} is not one of {list(DTYPES)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return dataclass_from_dict(cls, values)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls.from_dict(json.loads(text))
