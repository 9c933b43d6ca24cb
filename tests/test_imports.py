"""The package's import graph, read from the source (every import statement, function-level ones too):
no module imports another that imports it back, however far round, and only the shells import ``train``."""

import ast

from helpers import REPO

PACKAGE = "dora_diffusion"
# What may import the training loop: the shells that start runs (the CLI, the app's engine through its jobs,
# the demo, and compare and sweep, which train the runs they compare), and train itself.
TRAIN_IMPORTERS = {f"{PACKAGE}.{m}" for m in ("cli", "engine.jobs", "demo", "compare", "sweep", "train")}


def _modules() -> dict[str, ast.Module]:
    """``{dotted module name: parsed source}`` of every ``.py`` file of the package."""
    found = {}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return found


def _is_package(name: str) -> bool:
    return (REPO / name.replace(".", "/") / "__init__.py").is_file()


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (``from ..x import y`` inside ``a.b.c``: ``a.x``)."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not _is_package(importer):  # a plain module's ``.`` is its package
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """``{module: the package's modules it imports}``; ``from p import name`` counts ``p.name`` when that is
    a module, else ``p`` (a package's ``__init__``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for importer, tree in modules.items():
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(importer, node)
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            graph[importer].update(t for t in targets if t in modules and t != importer)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert f"{PACKAGE}.formats.load" in graph[f"{PACKAGE}.formats"]  # from .load import ...
    assert f"{PACKAGE}.formats.base" in graph[f"{PACKAGE}.formats.kohya"]  # from .base import (...)
    assert f"{PACKAGE}.inject" in graph[f"{PACKAGE}.formats.base"]  # from ..inject import ...
    # cli imports the app's pieces inside its command functions
    assert any(m.startswith(f"{PACKAGE}.") for m in graph[f"{PACKAGE}.cli"])
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (each: the modules that import each other, directly or round about): " + "; ".join(
        " <-> ".join(c) for c in found
    )


def _train_importers() -> set[str]:
    return {m for m, deps in import_graph().items() if f"{PACKAGE}.train" in deps} - TRAIN_IMPORTERS


def test_only_the_shells_import_train():
    importers = sorted(_train_importers())
    assert not importers, (
        f"{', '.join(importers)} import {PACKAGE}.train; facts a run or a model holds live in "
        "runs / models, and only the shells that start runs import the loop"
    )
