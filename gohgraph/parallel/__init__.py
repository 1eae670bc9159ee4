"""Parallelism applied to a built model from outside (torchtitan style): data parallel (DDP / FSDP2)
and expert parallel (routed experts sharded over the ranks, all-to-all dispatch)."""
