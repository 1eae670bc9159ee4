"""The package layout of docs/layout.md: no import cycles, and imports only flow down the layers.

Every ``import`` and ``from ... import`` in the package (function-level ones too) is read with
``ast``; the repository's ``viz/`` folder counts as ``gohgraph.viz``, where it installs. The order
is the layout's data flow, ops -> layers -> routers/moe -> models -> training -> experiments -> cli, with
``analysis/`` (everything below training: the trainer logs stats) under ``training/``.

Also: model families are told apart in ``models/`` and ``config.py`` only (the families
registry); no other module compares ``model_type``, except the sites listed in
:data:`MODEL_TYPE_SWITCHES`, which are still to move and may only go.
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
# the package's __init__ is the public API: it may re-export from any layer
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
        raise AssertionError(f"{module} is in no layer of docs/layout.md: add its folder to LAYERS")
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
    assert not offending, "imports against docs/layout.md's order:\n" + "\n".join(sorted(offending))


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


def test_no_folder_imports_a_folder_that_imports_it():
    """A folder that straddles another (as ``analysis/`` did ``training/`` while it held the
    comparison of variants) shows as two folders importing each other."""
    folder_of = lambda module: ".".join(module.split(".")[:2])  # noqa: E731
    edges = {(folder_of(m), folder_of(t)) for m, ts in import_graph().items() if m != PUBLIC_API
             for t in ts if folder_of(m) != folder_of(t)}
    both_ways = sorted(f"{a} <-> {b}" for a, b in edges if (b, a) in edges and a < b)
    assert not both_ways, "folders importing each other:\n" + "\n".join(both_ways)


# ---------------------------------------------------------------------- model_type switches
# where a model family may be named: the models themselves and the config that declares the field
MODEL_TYPE_HOME = ("gohgraph.models", "gohgraph.config")
# comparisons of model_type outside MODEL_TYPE_HOME that are still to be replaced by the families
# registry (issue 28): module -> how many. A new one fails the test; a removed one must be removed here.
MODEL_TYPE_SWITCHES = {
}


def model_type_comparisons(path):
    """Line numbers of ``==`` / ``!=`` / ``in`` comparisons with ``model_type`` (an attribute
    ``x.model_type`` or a key ``x["model_type"]``) on either side."""
    def names_model_type(node):
        if isinstance(node, ast.Attribute):
            return node.attr == "model_type"
        if isinstance(node, ast.Subscript):
            key = node.slice
            return isinstance(key, ast.Constant) and key.value == "model_type"
        return False

    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                 for op in node.ops):
            if any(names_model_type(side) for side in [node.left, *node.comparators]):
                lines.append(node.lineno)
    return sorted(lines)


def test_model_type_is_compared_only_in_models_and_config():
    found = {}
    for module, path in source_files().items():
        if module == PUBLIC_API or any(module == home or module.startswith(home + ".") for home in MODEL_TYPE_HOME):
            continue
        lines = model_type_comparisons(path)
        if lines:
            found[module] = lines
    new = [f"{module}:{','.join(map(str, lines))}" for module, lines in sorted(found.items())
           if len(lines) > MODEL_TYPE_SWITCHES.get(module, 0)]
    assert not new, ("model_type compared outside models/ and config.py (ask the model, or a families "
                     "registry, instead):\n" + "\n".join(new))
    gone = [f"{module}: {count} listed, {len(found.get(module, []))} found" for module, count in
            sorted(MODEL_TYPE_SWITCHES.items()) if len(found.get(module, [])) < count]
    assert not gone, "model_type switches removed: lower MODEL_TYPE_SWITCHES to match:\n" + "\n".join(gone)


def test_the_model_type_check_sees_attributes_and_keys(tmp_path):
    source = tmp_path / "planted.py"
    source.write_text('if cfg.model_type == "seq2seq":\n    pass\nok = kwargs["model_type"] != "decoder"\n'
                      'fine = cfg.model_type\n')
    assert model_type_comparisons(source) == [1, 3]


def test_no_file_cites_the_design_notes_outside_the_repository():
    # issue 31: DESIGN.md is not in the repository, so a citation of it dangles (in the API docs too);
    # cite the docs page that covers the topic (docs/*.md) instead
    found = []
    for folder in ("gohgraph", "viz", "examples", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and b"DESIGN.md" in path.read_bytes():
                found.append(str(path.relative_to(ROOT)))
    assert not found, "DESIGN.md is not in the repository; cite a page of docs/ instead:\n" + "\n".join(found)


def test_no_command_imports_another_command():
    """The CLI's commands share what they share through ``gohgraph.cli.common`` (and the helpers it
    names), never through another command's module: a command is a leaf."""
    from gohgraph.cli.main import COMMANDS

    commands = {f"gohgraph.cli.{name}" for name in COMMANDS}
    graph = import_graph()
    crossing = sorted((module, target) for module in commands for target in graph.get(module, ())
                      if target in commands and target != module)
    assert not crossing, f"commands importing commands: {crossing}"
