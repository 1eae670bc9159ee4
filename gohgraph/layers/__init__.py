"""Transformer layers that know nothing of routing: projections, norms, MLPs, positions, KV caches, attention."""
