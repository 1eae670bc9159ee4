"""The README's results tables are the committed results files they name, number for number.

Each results section of the README ("Results", the decoder comparison; "Attention baselines at
matched FLOPs"; "Encoder results", the masked-LM comparison) names one file under ``benchmarks/results/`` (the ``compare.md`` that
``gohgraph bench --quick [--objective mlm] --out ...`` writes). Both tables are parsed; every row of
the README's table must be a row of the file's first table with the same numbers in every column.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS_HEADINGS = ("## Results", "## Attention baselines at matched FLOPs", "## Encoder results")
RESULTS_FILE = re.compile(r"`(benchmarks/results/[\w./-]+\.md)`")
NUMBER = re.compile(r"[+-]?\d[\d,]*(?:\.\d+)?")


def section(text: str, heading: str) -> str:
    """The lines from the heading that starts with ``heading`` up to the next ``## `` heading."""
    start = text.index("\n" + heading) + 1
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end >= 0 else len(text)]


def first_table(text: str):
    """``(header, rows)`` of the first Markdown table in ``text``: cells stripped, the rule row left out."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, rule, *rows = table
    assert all(set(cell) <= set("-: ") for cell in rule), f"no Markdown table rule under {header}"
    return header, rows


def numbers(cell: str):
    """The numbers of a cell, as floats (thousands separators dropped; ``-`` alone is no number)."""
    return [float(match.replace(",", "")) for match in NUMBER.findall(cell)]


def readme_results(heading: str):
    results = section(README.read_text(encoding="utf-8"), heading)
    named = sorted(set(RESULTS_FILE.findall(results)))
    assert len(named) == 1, f"the README's results section must name one results file, names {named}"
    return results, ROOT / named[0]


@pytest.mark.parametrize("heading", RESULTS_HEADINGS)
def test_readme_results_section_names_a_committed_results_file(heading):
    _, path = readme_results(heading)
    assert path.is_file(), f"{path.relative_to(ROOT)} is named by the README but not committed"


@pytest.mark.parametrize("heading", RESULTS_HEADINGS)
def test_readme_results_table_equals_the_committed_file(heading):
    results, path = readme_results(heading)
    readme_header, readme_rows = first_table(results)
    file_header, file_rows = first_table(path.read_text(encoding="utf-8"))
    assert readme_header == file_header
    assert readme_rows, "the README's results table has no rows"
    by_variant = {row[0]: row for row in file_rows}
    for row in readme_rows:
        assert row[0] in by_variant, f"README row {row[0]!r} is not in {path.name}"
        committed = by_variant[row[0]]
        assert len(row) == len(committed) == len(readme_header), row[0]
        for column, cell, expected in zip(readme_header, row, committed):
            assert numbers(cell) == numbers(expected), f"{row[0]} / {column}: README {cell!r}, {path.name} {expected!r}"
            assert cell == expected, f"{row[0]} / {column}: README {cell!r}, {path.name} {expected!r}"
    assert [row[0] for row in readme_rows] == [row[0] for row in file_rows], "the README leaves out or reorders rows"


def test_numbers_parse_table_cells():
    assert numbers("117,056 (+0.00%)") == [117056.0, 0.0]
    assert numbers("+0.048 ± 0.043 (tie)") == [0.048, 0.043]
    assert numbers("2x2/16") == [2.0, 2.0, 16.0]
    assert numbers("-") == []
