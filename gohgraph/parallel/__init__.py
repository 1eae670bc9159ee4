"""Parallelism applied to a built model from outside (torchtitan style): data parallel (DDP / FSDP2)."""
