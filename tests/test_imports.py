"""The package's floors hold: no import circle in `lbgen/`, and imports run down the floors only.

The graph is read from the source with `ast`, every import counted, those inside functions and
`TYPE_CHECKING` blocks too: an import hidden in a function still ties the modules together.
Importing `lbgen.a.b` from outside package `lbgen.a` also runs `lbgen/a/__init__.py`, so that
package is a dependency too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lbgen

PACKAGE = Path(lbgen.__file__).parent

# Top floor first. A module may import its own floor's modules (the circle test keeps those acyclic)
# and any floor below; `lbgen/__init__.py` and `lbgen/errors.py` are the ground everyone stands on.
FLOORS = (("cli",), ("stages",), ("models",), ("data",), ("runtime",), ("config", "method"), ("errors", ""))


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package under `root`."""
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _known(name: str, modules) -> str:
    """The longest prefix of dotted `name` that is a module of the package."""
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def imports_of(name: str, path: Path, modules) -> set[str]:
    """The package's modules that module `name` (at `path`) imports, with the packages those imports run."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    root = name.split(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule `pkg.sub` where one exists, else a name of `pkg`.
            targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    deps = set()
    for target in targets:
        if target != root and not target.startswith(root + "."):
            continue
        target = _known(target, modules)
        deps.add(target)
        parent = target.rpartition(".")[0]
        while parent.count(".") >= 1 and not name.startswith(parent + "."):  # packages entered from outside
            deps.add(parent)
            parent = parent.rpartition(".")[0]
    deps.discard(name)
    return deps


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (circle := visit(dep)):
                return circle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def floor(module: str) -> int:
    """The floor of a module of `lbgen`: 0 is the top (cli)."""
    part = module.split(".")[1] if "." in module else ""
    return next(i for i, names in enumerate(FLOORS) if part in names)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if floor(b) < floor(a))


def test_lbgen_has_no_import_circle():
    circle = find_circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_lbgen_imports_run_down_the_floors_only():
    assert upward_imports(import_graph()) == []


def test_every_subpackage_has_a_floor():
    assert all(floor(name) >= 0 for name in import_graph())


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    """A copy of the package with `files` (relative path -> source) written over it."""
    import shutil

    copy = tmp_path / "lbgen"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors", "*.txt", "*.json"))
    for relative, source in files.items():
        target = copy / relative
        target.write_text(target.read_text() + source if target.exists() else source)
    return copy


@pytest.mark.parametrize("planted, expected", [
    # config asking the stage registry (what config/paths.py once did): config -> stages -> ... -> config
    ({"config/paths.py": "\n\ndef _planted():\n    from lbgen.stages import STAGES\n"}, "lbgen.config.paths"),
    # two stage modules that need each other (classify and evaluate once did)
    ({"stages/classify.py": "\n\ndef _planted():\n    from lbgen.stages.evaluate import evaluate\n"}, "lbgen.stages.classify"),
])
def test_a_planted_circle_is_found(tmp_path, planted, expected):
    circle = find_circle(import_graph(_plant(tmp_path, planted)))
    assert circle is not None and expected in circle


def test_a_planted_upward_import_is_found(tmp_path):
    graph = import_graph(_plant(tmp_path, {"runtime/outputs.py": "\nfrom lbgen.data.format import MANIFEST\n"}))
    assert upward_imports(graph) == ["lbgen.runtime.outputs -> lbgen.data", "lbgen.runtime.outputs -> lbgen.data.format"]
