"""The docs site builds with warnings as errors, and its API reference covers every public name.

The build is ``sphinx-build -W --keep-going -b html docs <tmp>``, the command ``.ci/run`` runs, into a
temporary folder. Sphinx, furo and myst-parser come with the ``test`` extra (and the ``docs`` extra).
Without them the tests skip on a developer's machine, saying why, and fail under CI (the ``CI``
environment variable set, as ``.ci/run`` sets it), which must build the docs.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gohgraph

DOCS = Path(__file__).resolve().parents[1] / "docs"
DOCS_TOOLS = ("sphinx", "furo", "myst_parser")
PICTURES = ("routing_graphs.png", "head_load_heatmap.png", "token_trace.png")
BUILD_TIMEOUT_S = 600

pytestmark = pytest.mark.slow


def no_docs_tools(reason: str):
    """Skip on a developer's machine; fail under CI, which must build the docs."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI (the CI environment variable is set) must build the docs", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    """The HTML site built from docs/ with warnings as errors: ``(html folder, sphinx's output)``."""
    missing = [name for name in DOCS_TOOLS if importlib.util.find_spec(name) is None]
    if missing:
        no_docs_tools(f"no docs tools: {', '.join(missing)} not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("docs")
    html, doctrees = out / "html", out / "doctrees"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-d", str(doctrees), str(DOCS), str(html)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, f"sphinx-build -W failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return html, proc.stdout + proc.stderr


def test_docs_build_with_no_warning(built_site):
    html, output = built_site
    assert "WARNING" not in output and "ERROR" not in output, output[-6000:]
    assert (html / "index.html").is_file() and (html / "api" / "public.html").is_file()


def test_every_public_name_has_an_api_entry(built_site):
    html, _ = built_site
    public = (html / "api" / "public.html").read_text(encoding="utf-8")
    names = list(gohgraph.__all__)
    assert "GoHConfig" in names and "from_pretrained" in names
    missing = [name for name in names if f'id="gohgraph.{name}"' not in public]
    assert not missing, f"public names without an entry in the API reference: {missing}"


def test_api_pages_render_the_docstrings_math(built_site):
    """The routers' docstrings state their math in reST; the API pages must carry it to MathJax."""
    html, _ = built_site
    routers = (html / "api" / "routers.html").read_text(encoding="utf-8")
    assert 'id="gohgraph.routers.gat.GraphAttention"' in routers
    assert 'class="math' in routers and "\\alpha_{ji}" in routers


def test_analysis_guide_shows_the_pictures(built_site):
    html, _ = built_site
    page = (html / "analysis.html").read_text(encoding="utf-8")
    for picture in PICTURES:
        assert f"_images/{picture}" in page, picture
        assert (html / "_images" / picture).is_file(), picture
