"""One module per ``gohgraph`` sub-command: ``add_arguments(parser)`` and ``run(args) -> int``."""
