"""``python -m gohgraph``: the command line (also what ``torchrun -m gohgraph`` runs)."""

from .cli.main import main

raise SystemExit(main())
