"""Parallelism applied to a built model from outside (torchtitan style): data parallel (DDP / FSDP2),
expert parallel (routed experts sharded over the ranks, all-to-all dispatch) and tensor parallel
(attention heads and FFN hidden units sharded through DTensor, head routers replicated)."""
