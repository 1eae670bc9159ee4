"""Experiments that run the trainer: the comparison of dense, MoH, GoH and expert variants at matched
size (variants, runs, records, report). Above ``training/`` in the package layout (docs/layout.md) (it trains
models through it), below ``cli/`` (``gohgraph bench`` runs it); was ``analysis/compare``."""
