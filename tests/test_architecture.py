"""The import graph (docs/ARCHITECTURE.md): no circle, and no module imports a higher layer."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "disc_pl"
# Lowest first. A module may import its own layer (without a circle) and the layers below.
LAYERS = [
    {"errors", "utils", "allocator"},
    {"nets", "data", "metrics", "tracking", "console", "viz", "figures", "report_html", "checks"},
    {"cf"},
    {"models"},
    {"validate"},
    {"job", "validity", "shortcut"},
    {"run", "train", "evaluate", "report", "bench", "cli"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """disc_pl modules imported anywhere in the file (function-local imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("disc_pl")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("disc_pl"):
            for alias in node.names:  # `from disc_pl import run` imports the module disc_pl.run
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (SRC.parent / (sub.replace(".", "/") + ".py")).exists()
                          or (SRC.parent / sub.replace(".", "/")).is_dir() else node.module)
    return found


GRAPH = {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS (tests/test_architecture.py, docs/ARCHITECTURE.md)")


def test_every_module_has_a_layer():
    for module in GRAPH:
        if module != "disc_pl":
            _layer(module)


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "disc_pl"))
def test_no_upward_import(module):
    up = [dep for dep in GRAPH[module] if dep != "disc_pl" and _layer(dep) > _layer(module)]
    assert not up, f"{module} imports higher layers: {up}"


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(GRAPH.get(module, ())):
            if dep == module or dep not in GRAPH:
                continue
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [module, dep]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
