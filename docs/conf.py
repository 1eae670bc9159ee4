"""Sphinx configuration of gohgraph's docs site.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (warnings are errors, as in CI).
"""

import os
import sys

# the package is installed (pip install -e ".[docs]"); the path makes a plain checkout build too
sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("MPLBACKEND", "Agg")

from gohgraph.version import __version__  # noqa: E402

project = "gohgraph"
author = "gohgraph contributors"
copyright = "gohgraph contributors"
release = __version__
version = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: $...$ and $$...$$ math in the Markdown pages, ::: fences, heading anchors for links
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# autodoc: document members in source order, with the docstrings' own Args/Returns (Google style)
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_typehints = "signature"
# torch.autograd.Function and nn.Module docstrings cite labels of PyTorch's own docs: do not inherit them
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"gohgraph {release}"
html_static_path = []
