"""Experiments that run the trainer: the comparison of dense, MoH, GoH and expert variants at matched
size (variants, runs, records, report). Above ``training/`` in DESIGN.md §7's layout (it trains
models through it), below ``cli/`` (``gohgraph bench`` runs it); was ``analysis/compare``."""
