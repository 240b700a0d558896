"""The package's import graph has no cycle: every ``import`` of an ``xright_pl`` module, at module level or inside
a function, counts (a lazy import only hides a cycle from Python, not from a reader)."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "xright_pl"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """``module -> the xright_pl modules it imports`` (``from a import b`` counts as ``a.b`` when that is a module)."""
    modules = {module_name(p): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert {"xright_pl.module", "xright_pl.selectors", "xright_pl.cli"} <= set(graph)  # the walk sees the package
    assert "xright_pl.selectors" in graph["xright_pl.module"]
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_nothing_imports_the_commands():
    """Commands (``python -m xright_pl <command>``) are entry points: only the command line dispatches to them."""
    graph = import_graph()
    users = {m for m, targets in graph.items() for t in targets if t.startswith("xright_pl.commands")}
    assert not {u for u in users if not u.startswith("xright_pl.commands")}, users


# ------------------------------------------------------------------------------------------------- layers
#: The layers of ARCHITECTURE.md, bottom first: a module may import its own layer and the layers below, never one
#: above. Within the "parts" layer the four parts are peers that do not import each other.
LAYERS: list[dict[str, tuple[str, ...]]] = [
    {"core": ("errors", "types", "assets", "optimum", "commandline", "lightning_private", "demo")},
    {
        "objectives": ("losses", "objectives"),
        "selectors": ("selectors",),
        "data": ("data",),
        "models": ("models", "lora"),
    },
    {"training": ("module", "steps", "reference", "guards", "rng", "distributed", "metrics", "fused")},
    {"inference": ("generate", "judge", "export")},
    {"callbacks": ("callbacks", "checkpoint", "trajectory", "progress", "signals", "eval_callback")},
    {"commands": ("cli", "startup", "commands", "__main__", "")},  # "": the package's __init__ (its public names)
]


def place(module: str) -> tuple[int, str]:
    """``(layer index, part)`` of an ``xright_pl`` module (``xright_pl.data.chat`` -> the ``data`` part)."""
    rest = module.removeprefix("xright_pl").removeprefix(".")
    head = rest.split(".")[0]
    for i, parts in enumerate(LAYERS):
        for part, members in parts.items():
            if head in members:
                return i, part
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to ARCHITECTURE.md")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in graph.items():
        (layer, part) = place(module)
        for target in targets:
            t_layer, t_part = place(target)
            if t_layer > layer:
                found.append(f"{module} ({part}) imports {target} ({t_part}), a layer above")
            elif t_layer == layer == 1 and t_part != part:
                found.append(f"{module} ({part}) imports {target} ({t_part}), a peer part")
    return sorted(found)


def test_layer_checker_catches_upward_and_peer_imports():
    assert layer_violations({"xright_pl.losses": {"xright_pl.module"}}) == [
        "xright_pl.losses (objectives) imports xright_pl.module (training), a layer above"
    ]
    assert layer_violations({"xright_pl.data.sources": {"xright_pl.selectors"}}) == [
        "xright_pl.data.sources (data) imports xright_pl.selectors (selectors), a peer part"
    ]
    assert layer_violations({"xright_pl.module": {"xright_pl.losses", "xright_pl.errors"}}) == []


def test_every_module_is_in_a_layer_and_imports_only_downwards():
    graph = import_graph()
    for module in graph:
        place(module)
    assert not layer_violations(graph), "\n".join(layer_violations(graph))
