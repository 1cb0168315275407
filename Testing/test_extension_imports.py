"""The engine's architecture, checked from its source: no import cycle, and dependencies that run one way.

Every ``import`` in ``RaptorExtension/`` counts, also those inside functions
(a lazy import that closes a circle is still a circle; it only fails later).
Imports under ``if TYPE_CHECKING:`` never run and are left out.

The layers, top to bottom (a module may import its own subpackage and any
lower layer, never a higher one or a sibling at its own layer):

====  ===============================  =====================================
  5   ``cli``, ``slicerlogic``          the command line; the Slicer modules' logic
  4   ``server``                        the Raptor server and its client
  3   ``cohort``, ``probes``            batch jobs; probes and explanations
  2   ``encoding``                      models, the triaxial encoder, the pipeline
  1   ``volumes``, ``embeddings``       reading volumes; embedding formats
  0   ``errors``, ``names``, ...        the top-level modules
====  ===============================  =====================================
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "RaptorExtension"
PACKAGE = "RaptorExtension"

LAYERS = {
    "cli": 5,
    "slicerlogic": 5,
    "server": 4,
    "cohort": 3,
    "probes": 3,
    "encoding": 2,
    "volumes": 1,
    "embeddings": 1,
}
TOP_LEVEL = 0


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in ENGINE.rglob("*.py") if "__pycache__" not in p.parts}


def is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for inner in node.body:
                    lines.update(range(inner.lineno, inner.end_lineno + 1))
    return lines


def imports_of(name: str, modules: dict[str, Path]) -> set[str]:
    """The engine modules that ``name`` imports (resolved to modules, packages where nothing finer exists)."""
    path = modules[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    package = name if is_package(name, modules) else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    found.add(_deepest_module(alias.name, modules))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else _deepest_module(target, modules))
    found.discard(name)
    return found


def _deepest_module(dotted: str, modules: dict[str, Path]) -> str:
    parts = dotted.split(".")
    while ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, modules) for name in modules}


def layer_of(name: str) -> tuple[str, int]:
    parts = name.split(".")
    if len(parts) < 3:  # RaptorExtension.errors, RaptorExtension.names, ...
        return parts[-1] if len(parts) == 2 else PACKAGE, TOP_LEVEL
    return parts[1], LAYERS.get(parts[1], -1)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_every_subpackage_has_a_layer():
    modules = all_modules()
    subpackages = {n.split(".")[1] for n in modules if n.count(".") >= 1 and is_package(n, modules) and n != PACKAGE}
    assert subpackages == set(LAYERS), f"subpackages {sorted(subpackages)} vs layers {sorted(LAYERS)}: give each its layer here"


def test_the_engine_has_no_import_cycle():
    graph = import_graph()
    # The package facades (__init__ files that re-export for users) are checked separately below.
    modules = all_modules()
    facades = {n for n in modules if is_package(n, modules)}
    inner = {n: {m for m in deps if m not in facades} for n, deps in graph.items() if n not in facades}
    cycle = find_cycle(inner)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle through a package __init__: " + " -> ".join(cycle)


def test_modules_import_modules_not_package_facades():
    """Inside the engine, ``from ..cohort.run import run_batch``, never ``from ..cohort import run_batch``.

    A facade import would make every module of a package load its whole
    ``__init__`` (and whatever it re-exports), and hides the real edge.
    """
    modules = all_modules()
    facades = {n for n in modules if is_package(n, modules)}
    offenders = []
    for name, deps in import_graph().items():
        if name in facades or name.endswith("__main__"):
            continue
        offenders += [f"{name} imports the package {dep}" for dep in deps if dep in facades]
    assert not offenders, "\n".join(offenders)


def test_dependencies_run_down_the_layers():
    wrong = []
    for name, deps in import_graph().items():
        group, level = layer_of(name)
        assert level >= 0, f"{name}: its subpackage {group!r} has no layer in this test"
        for dep in deps:
            dep_group, dep_level = layer_of(dep)
            if dep == PACKAGE or name == PACKAGE or dep_group == group:
                continue
            if name.endswith("__main__"):
                continue
            if dep_level >= level and not (level == TOP_LEVEL and dep_level == TOP_LEVEL):
                wrong.append(f"{name} (layer {level}) imports {dep} (layer {dep_level})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("graph", [{"a": {"b"}, "b": {"c"}, "c": {"a"}}, {"a": {"a2"}, "a2": {"a"}}])
def test_the_cycle_finder_finds_cycles(graph):
    """The check above would pass vacuously if the finder missed cycles."""
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]


def test_the_import_graph_sees_lazy_imports():
    """A function-level import is an edge: cohort.run imports the pipeline only when it runs."""
    graph = import_graph()
    assert "RaptorExtension.encoding.pipeline" in graph["RaptorExtension.cohort.run"]
    assert "RaptorExtension.volumes.prefetch" in graph["RaptorExtension.encoding.pipeline"]
