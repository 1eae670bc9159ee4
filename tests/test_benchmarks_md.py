"""BENCHMARKS.md and the docs name only files the repository holds.

Every ``benchmarks/results/...`` path they name (as a path, or as a bare results-file name under a
section that names its folder), every script (``benchmarks/*.py``, ``examples/*.py``, a bare
``bench_*.py``), every repository path in backticks, and every ``git show COMMIT:PATH`` of an older
results file must exist; a number whose output went to the ignored ``runs/`` folder or to ``/tmp``
has no committed source (issue #31). The checks are textual: they keep a page from citing a file that
was renamed, never committed or deleted.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
PAGES = [BENCHMARKS_MD, ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

RESULTS_PATH = re.compile(r"benchmarks/results/[\w.*/-]*[\w*/]")
SCRIPT_PATH = re.compile(r"(?:benchmarks|examples)/[\w/-]+\.py")
BARE_BENCH_SCRIPT = re.compile(r"(?<![\w/])(bench_\w+\.py)")
BACKTICKED = re.compile(r"`([^`\s]+)`")
# a bare results file or folder: "head_sparse_flops.md", "full_moh/", "full_seeds3-5/", "full_moh/compare.json"
BARE_RESULT = re.compile(r"^(?:compare|full|head_sparse|kv_cache|initial_routing|parallel)[\w.-]*(?:/[\w.-]*?)?"
                         r"(?:\.(?:md|json|png|txt)|/)$")
GIT_SHOW = re.compile(r"git show ([0-9a-f]{7,40}):([\w./-]+)")
TOP_LEVEL = {path.name for path in ROOT.iterdir() if not path.name.startswith(".")}


def named(pattern, pages=PAGES):
    """``(page name, match)`` for every match of ``pattern`` in the pages, in order."""
    return [(page.name, match) for page in pages for match in pattern.findall(page.read_text(encoding="utf-8"))]


def exists(relative: str) -> bool:
    if "*" in relative:
        return any(ROOT.glob(relative))
    return (ROOT / relative).exists()


def test_every_results_path_named_exists():
    paths = named(RESULTS_PATH)
    assert any(page == "BENCHMARKS.md" for page, _ in paths), "BENCHMARKS.md names no results file"
    missing = [f"{page}: {path}" for page, path in paths if not exists(path)]
    assert not missing, "named but not committed:\n" + "\n".join(missing)


def test_every_bare_results_name_in_benchmarks_md_is_under_benchmarks_results():
    names = [name for _, name in named(BACKTICKED, [BENCHMARKS_MD]) if BARE_RESULT.match(name)]
    assert names, "the pattern for bare results names matches nothing: update it with the page"
    missing = [name for name in names if not (ROOT / "benchmarks" / "results" / name).exists()]
    assert not missing, f"not under benchmarks/results/: {missing}"


def test_every_script_named_exists():
    scripts = named(SCRIPT_PATH)
    assert any(path.startswith("benchmarks/") for _, path in scripts)
    missing = [f"{page}: {path}" for page, path in scripts if not (ROOT / path).is_file()]
    assert not missing, "named but not in the repository:\n" + "\n".join(missing)


def test_every_bench_script_named_exists_in_benchmarks():
    scripts = named(BARE_BENCH_SCRIPT)
    assert len({name for _, name in scripts}) >= 8, "BENCHMARKS.md names each bench_*.py it reports"
    missing = sorted({f"{page}: {name}" for page, name in scripts if not (ROOT / "benchmarks" / name).is_file()})
    assert not missing, "no such script in benchmarks/:\n" + "\n".join(missing)


def test_every_repository_path_in_backticks_exists():
    """A backticked ``dir/...`` path whose first part is a top-level entry of the repository (``gohgraph/``,
    ``tests/``, ``docs/``, ``benchmarks/``, ``examples/``) must exist: the layout moved once already."""
    missing = []
    for page, token in named(BACKTICKED):
        path = token.rstrip(".,;:)")
        head = path.split("/", 1)[0]
        if "/" in path and head in TOP_LEVEL and head != "runs" and not exists(path):
            missing.append(f"{page}: {token}")
    assert not missing, "named but not in the repository:\n" + "\n".join(missing)


def test_no_number_in_benchmarks_md_cites_an_ignored_or_temporary_output_as_its_source():
    """``runs/`` is ignored by git and ``/tmp`` is not the repository: BENCHMARKS.md may name them only to
    say that an output there is not committed."""
    text = BENCHMARKS_MD.read_text(encoding="utf-8")
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        if re.search(r"--out runs/|`/tmp`|/work/runs/", paragraph):
            assert re.search(r"(not|never) committed|no output of theirs was committed", paragraph), paragraph[:300]


@pytest.mark.parametrize("text,found", [
    ("see `benchmarks/results/full_moh/`.", ["benchmarks/results/full_moh/"]),
    ("(`benchmarks/results/compare.md` / `.json`)", ["benchmarks/results/compare.md"]),
    ("`benchmarks/results/head_sparse_*.md`, BENCHMARKS.md", ["benchmarks/results/head_sparse_*.md"]),
])
def test_results_path_pattern(text, found):
    assert RESULTS_PATH.findall(text) == found


@pytest.mark.parametrize("token,is_result", [
    ("head_sparse_flops.md", True), ("full_seeds3-5/", True), ("full_moh/compare.json", True),
    ("compare.py", False), ("bench_moe.py", False), ("docs/layout.md", False),
])
def test_bare_results_name_pattern(token, is_result):
    assert bool(BARE_RESULT.match(token)) == is_result
