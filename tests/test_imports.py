"""The package's own imports form no cycle and never run from a low layer up to a higher one.

Every ``import`` of a ``stepdistill`` module is read from the source (those inside functions too, which hide a
cycle rather than remove it). ``python tests/test_imports.py`` prints the figures: internal imports, how many
sit inside functions, cycles, upward imports, and the longest files.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "stepdistill"

#: bottom first; a module may import from its own layer (its package) and the layers below it
LAYERS = [
    ("config",),
    ("schedule",),
    ("conditioning",),
    ("cache", "locks"),
    ("lpips",),
    ("backbones",),
    ("guided",),
    ("denoiser",),
    ("",),  # the package itself: Cond, Denoiser, NoiseSchedule, __version__
    ("solvers",),
    ("prompts",),
    ("models",),
    ("data",),
    ("pairs", "trajectories"),
    ("pipelines",),
    ("trainers",),
    ("metrics",),
    ("runs",),
    ("quickstart",),
    ("cli", "__main__"),
]


def modules() -> dict[str, Path]:
    """Dotted module name (``stepdistill.trainers.dmd``; a package by its ``__init__``) -> file."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(mods: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """(importer, imported, inside a function) for every import of a package module."""
    out = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        in_function = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function.update(id(n) for n in ast.walk(node) if n is not node)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = (".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                        if node.level else node.module or "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target not in mods and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in mods and target != name:
                    out.append((name, target, id(node) in in_function))
    return out


def cycles(edges) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def layer(module: str) -> int:
    rest = module.split(".", 1)[1] if "." in module else ""
    top = rest.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_imports.py: add it to LAYERS")


def upward(edges) -> list[tuple[str, str]]:
    return sorted({(a, b) for a, b, _ in edges if layer(b) > layer(a)})


def test_the_package_imports_form_no_cycle():
    assert cycles(imports(modules())) == []


def test_no_module_imports_from_a_higher_layer():
    assert upward(imports(modules())) == []


def test_every_module_has_a_layer():
    for module in modules():
        layer(module)


def test_the_scan_sees_a_cycle_and_an_upward_import(tmp_path):
    edges = [("stepdistill.data", "stepdistill.models", True), ("stepdistill.models", "stepdistill.data", False),
             ("stepdistill.config", "stepdistill.trainers.registry", True)]
    assert cycles(edges) == [["stepdistill.data", "stepdistill.models"]]
    assert upward(edges) == [("stepdistill.config", "stepdistill.trainers.registry"),
                             ("stepdistill.models", "stepdistill.data")]


if __name__ == "__main__":
    mods = modules()
    edges = imports(mods)
    lengths = sorted(((len(p.read_text().splitlines()), p.relative_to(PACKAGE.parent)) for p in mods.values()),
                     reverse=True)
    print(f"internal imports: {len(edges)} ({sum(f for *_, f in edges)} inside functions)")
    print(f"cycles: {cycles(edges)}")
    print(f"upward imports: {upward(edges)}")
    print(f"longest files: {', '.join(f'{p} {n}' for n, p in lengths[:5])}; over 400 lines: "
          f"{sum(n > 400 for n, _ in lengths)}")
