"""The package layout of DESIGN.md §7: no import cycles, and imports only flow down the layers.

Every ``import`` and ``from ... import`` in the package (function-level ones too) is read with
``ast``; the repository's ``viz/`` folder counts as ``gohgraph.viz``, where it installs.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# bottom first: a module may import from its own layer group and the ones below it, never above.
# Folders on one level (interop and parallel) are separate concerns and may not import each other.
LAYERS = [
    ("gohgraph.config", "gohgraph.graph", "gohgraph.routing", "gohgraph.storage", "gohgraph.version"),
    ("gohgraph.ops",),
    ("gohgraph.layers",),
    ("gohgraph.routers",),
    ("gohgraph.moe",),
    ("gohgraph.models",),
    ("gohgraph.interop", "gohgraph.parallel"),
    ("gohgraph.data",),
    ("gohgraph.analysis", "gohgraph.analysis.stats", "gohgraph.analysis.timing", "gohgraph.analysis.student_t"),
    ("gohgraph.training",),
    ("gohgraph.experiments",),
    ("gohgraph.viz",),
    ("gohgraph.cli",),
    ("gohgraph.__main__",),
]
# the package's __init__ is the public API (DESIGN.md §6): it may re-export from any layer
PUBLIC_API = "gohgraph"
ROOT_LEVEL = LAYERS[0]


def source_files():
    """``{module name: path}`` of every module of the installed package."""
    files = {}
    for folder, package in ((ROOT / "gohgraph", "gohgraph"), (ROOT / "viz", "gohgraph.viz")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([package, *parts])] = path
    return files


def imported_modules(name, path, known):
    """Modules of the package that ``name`` imports (resolved to the longest known module name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # "from a.b import c" imports the module a.b.c if there is one, else a name of a.b
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer_of(module):
    """``(level, group)`` of the longest group that contains ``module``."""
    matches = [(len(group), level, group) for level, groups in enumerate(LAYERS) for group in groups
               if module == group or module.startswith(group + ".")]
    if not matches:
        raise AssertionError(f"{module} is in no layer of DESIGN.md §7: add its folder to LAYERS")
    _, level, group = max(matches)
    return level, group


def import_graph():
    files = source_files()
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def test_every_module_sits_in_a_layer():
    for module in import_graph():
        if module != PUBLIC_API:
            layer_of(module)


def test_no_import_goes_up_or_sideways():
    offending = []
    for module, imports in import_graph().items():
        if module == PUBLIC_API:
            continue
        level, group = layer_of(module)
        for target in imports:
            if target == PUBLIC_API:
                offending.append(f"{module} -> {target} (the public API is the top)")
                continue
            target_level, target_group = layer_of(target)
            upward = target_level > level
            sideways = target_level == level and target_group != group and group not in ROOT_LEVEL
            if upward or sideways:
                offending.append(f"{module} -> {target}")
    assert not offending, "imports against DESIGN.md §7's order:\n" + "\n".join(sorted(offending))


def test_no_import_cycles():
    graph = {module: {t for t in imports if not t.startswith(module + ".")} for module, imports in import_graph().items()}
    visiting, done, cycles = [], set(), []

    def visit(module):
        if module in done:
            return
        if module in visiting:
            cycles.append(" -> ".join(visiting[visiting.index(module):] + [module]))
            return
        visiting.append(module)
        for target in sorted(graph.get(module, ())):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("planted,expected", [
    ("from ..models.decoder import GoHTransformer\n", "gohgraph.layers.fake -> gohgraph.models.decoder"),
    ("from gohgraph.training import trainer\n", "gohgraph.layers.fake -> gohgraph.training.trainer"),
])
def test_the_checks_catch_an_upward_import(tmp_path, monkeypatch, planted, expected):
    fake = ROOT / "gohgraph" / "layers" / "fake.py"
    files = {**source_files(), "gohgraph.layers.fake": fake}
    known = set(files)
    source = tmp_path / "fake.py"
    source.write_text(planted, encoding="utf-8")
    imports = imported_modules("gohgraph.layers.fake", source, known)
    level, _ = layer_of("gohgraph.layers.fake")
    upward = [f"gohgraph.layers.fake -> {t}" for t in imports if layer_of(t)[0] > level]
    assert expected in upward
