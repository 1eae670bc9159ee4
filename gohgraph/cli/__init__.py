"""The gohgraph command line: main.py dispatches to one module per command; shared helpers in common.py."""
