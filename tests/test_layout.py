"""The package's stage folders import one way only: from their own folder, folders below, the base.

The order, top to bottom, is the layout of ../shared/STYLE.md: entry points (run, cli, the package's
own `__init__`), lab/, experiment, ship/, train/, model/, analysis/, data/, then the base
modules (config, config_rules, console, files, errors). Every import is read with `ast`, those
inside functions and under `TYPE_CHECKING` too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import twincar_fast

PACKAGE = Path(twincar_fast.__file__).parent
LAYERS = ["entry", "lab", "experiment", "ship", "train", "model", "analysis", "data", "base"]
ENTRY = {"run", "cli", "__init__"}
BASE = {"config", "config_rules", "console", "files", "errors", "run_folder"}


def layer_of(module: str) -> str:
    """The layer of a dotted module name inside the package (`twincar_fast.train.fit` → train)."""
    parts = module.split(".")[1:]
    top = parts[0] if parts else "__init__"
    if top in ENTRY:
        return "entry"
    if top in BASE:
        return "base"
    if top in LAYERS:
        return top
    raise AssertionError(f"{module}: not in the layout; add its folder to STYLE.md and this test")


def _imported(node: ast.AST, module: str) -> list[str]:
    """The package modules one import statement brings in (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("twincar_fast")]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        pkg = module.split(".")[: -node.level]
        base = ".".join([*pkg, *([base] if base else [])])
    if not base.startswith("twincar_fast"):
        return []
    if base != "twincar_fast":
        return [base]
    # `from twincar_fast import X`: a submodule or folder, a lazily re-exported name, or the root's
    # own light names (__version__, load_config ...), which live in the base
    out = []
    for alias in node.names:
        if (PACKAGE / alias.name).is_dir() or (PACKAGE / f"{alias.name}.py").exists():
            out.append(f"twincar_fast.{alias.name}")
        elif alias.name in twincar_fast._LAZY:
            out.append(twincar_fast._LAZY[alias.name])
        else:
            out.append("twincar_fast.config")
    return out


def upward_imports(source: str, module: str) -> list[str]:
    """`module imports target` for each import of `source` that reaches a layer above `module`'s."""
    own = LAYERS.index(layer_of(module))
    bad = []
    for node in ast.walk(ast.parse(source)):
        for target in _imported(node, module):
            if LAYERS.index(layer_of(target)) < own:
                bad.append(f"{module} (line {node.lineno}) imports {target}")
    return bad


def _package_modules() -> list[tuple[str, Path]]:
    """Every module of the package with its dotted name."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out.append((name.removesuffix(".__init__") if rel.name == "__init__" else name, path))
    return out


def test_no_module_imports_a_folder_above_it():
    modules = _package_modules()
    assert len(modules) > 20  # the whole package was read
    bad = [b for name, path in modules for b in upward_imports(path.read_text(), name)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_every_folder_says_what_it_is_for():
    for folder in ("lab", "ship", "train", "model", "analysis", "data"):
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
        assert doc and doc.endswith(".") and len(doc.splitlines()[0]) > 20, folder


@pytest.mark.parametrize(
    ("module", "source", "ok"),
    [
        ("twincar_fast.data.loaders", "from twincar_fast.model.learner import create_model", False),
        (
            "twincar_fast.analysis.plots",
            "def f():\n    from twincar_fast.ship import predict",
            False,
        ),
        ("twincar_fast.train.fit", "from twincar_fast.experiment import run_experiment", False),
        ("twincar_fast.ship.predict", "from twincar_fast import run_experiment", False),
        ("twincar_fast.model.learner", "from ..train import callbacks", False),
        ("twincar_fast.config", "import twincar_fast.data.dataset", False),
        ("twincar_fast.experiment", "from twincar_fast.train.fit import fit_run", True),
        ("twincar_fast.train.runs", "from twincar_fast import __version__", True),
        ("twincar_fast.model.learner", "from .precision import apply_speedups", True),
        ("twincar_fast.console", "from twincar_fast.config import ExperimentConfig", True),
    ],
)
def test_the_check_catches_upward_imports(module, source, ok):
    assert (upward_imports(source, module) == []) is ok


def _targets(node: ast.AST, module: str) -> set[str]:
    """The package modules an import statement runs: `from pkg import sub` runs pkg and pkg.sub."""
    out = set(_imported(node, module))
    if isinstance(node, ast.ImportFrom):
        for base in list(out):
            folder = PACKAGE.parent.joinpath(*base.split("."))
            for alias in node.names:
                if (folder / f"{alias.name}.py").exists() or (folder / alias.name).is_dir():
                    out.add(f"{base}.{alias.name}")
    return out


def import_graph() -> dict[str, set[str]]:
    """module → the package modules it imports, at module level or inside functions."""
    modules = _package_modules()
    names = {name for name, _ in modules}
    graph = {}
    for name, path in modules:
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            found |= _targets(node, name)
        graph[name] = (found & names) - {name}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of `graph`: its strongly connected parts of two or more modules."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_not_even_through_imports_inside_functions():
    graph = import_graph()
    assert len(graph) > 20 and graph["twincar_fast.data.loaders"]  # the whole package was read
    circles = import_circles(graph)
    assert not circles, "import circles:\n" + "\n".join(" ↔ ".join(c) for c in circles)


def test_the_check_finds_circles():
    line = {"a": {"b"}, "b": {"c"}, "c": set(), "d": set()}
    assert import_circles(line) == []
    assert import_circles({**line, "c": {"a"}}) == [["a", "b", "c"]]
    assert import_circles({**line, "d": {"b"}, "c": {"d"}}) == [["b", "c", "d"]]


def run_folder_literals(source: str) -> list[str]:
    """`line N: 'name'` for each run-folder file name that `source` spells as a string literal."""
    from twincar_fast.run_folder import RUN_FILE_NAMES, SHARED_NAMES

    names = RUN_FILE_NAMES - SHARED_NAMES  # data sets and caches name their own files alike
    return [
        f"line {node.lineno}: {node.value!r}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
    ]


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ('p = run / "summary.json"', 1),
        ("f\"{run / 'config.yaml'} exists\"", 1),
        ('"""Writes summary.json."""\np = run / SUMMARY_JSON', 0),
        ('p = data / "annotations.csv"', 0),
    ],
)
def test_the_check_catches_run_folder_file_names(source, found):
    assert len(run_folder_literals(source)) == found


def test_run_folder_file_names_are_spelled_only_in_run_folder():
    bad = [
        f"{name} {hit}"
        for name, path in _package_modules()
        if name != "twincar_fast.run_folder"
        for hit in run_folder_literals(path.read_text())
    ]
    assert not bad, "run-folder file names outside run_folder.py:\n" + "\n".join(bad)
