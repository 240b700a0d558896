"""The tree is the architecture: each module's layer is its folder, the layers are the map of ARCHITECTURE.md (top
first, a bare ``│`` line between two layers), and the import graph follows them: no cycle, no upward import, no
import between the parts of one layer, nothing imports the commands. Every ``import`` of an ``xright_pl`` module
counts, at module level or inside a function (a lazy import only hides a cycle from Python, not from a reader)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "xright_pl"
ROOT = ("__init__", "__main__")  # the entry points: the only modules at the package root


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
    assert {"xright_pl.training.module", "xright_pl.selectors", "xright_pl.commands.cli"} <= set(graph)  # the walk
    assert "xright_pl.selectors" in graph["xright_pl.training.module"]
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_nothing_imports_the_commands():
    """Commands (``python -m xright_pl <command>``) are entry points: only the command line dispatches to them."""
    graph = import_graph()
    users = {m for m, targets in graph.items() for t in targets if t.startswith("xright_pl.commands")}
    allowed = {"xright_pl", "xright_pl.__main__"}
    assert not {u for u in users if not u.startswith("xright_pl.commands") and u not in allowed}, users


# ------------------------------------------------------------------------------------------------- layers
def map_layers(text: str) -> list[tuple[str, ...]]:
    """The layers of the first code block of ARCHITECTURE.md, bottom first: its ``folder/`` lines, grouped between
    the bare ``│`` lines (the folders of one group are the parts of one layer)."""
    block = text.split("```")[1]
    layers: list[list[str]] = [[]]
    for line in block.splitlines():
        folder = re.match(r"^ ([a-z_]+)/\s", line)
        if folder:
            layers[-1].append(folder.group(1))
        elif line.strip() == "│" and layers[-1]:
            layers.append([])
    return [tuple(layer) for layer in reversed(layers) if layer]


LAYERS = map_layers((REPO / "ARCHITECTURE.md").read_text(encoding="utf-8"))


def test_the_map_reader():
    text = "x\n```\n top/  a\n    │\n b/  x\n     more\n c/  y\n    │\n low/  z\n```\n"
    assert map_layers(text) == [("low",), ("b", "c"), ("top",)]


def test_the_tree_is_the_map():
    """Every folder of the package is a layer (or part) of ARCHITECTURE.md's map and the other way round; only the
    entry points sit at the root; the commands are the top layer and core the bottom one."""
    on_map = [f for layer in LAYERS for f in layer]
    assert len(on_map) == len(set(on_map)), on_map
    folders = {p.parent.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE}
    assert folders == set(on_map), (
        f"folders not on the map: {folders - set(on_map)}; map folders missing: {set(on_map) - folders}"
    )
    at_root = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert at_root == sorted(ROOT), f"modules at the package root (put them in a folder): {set(at_root) - set(ROOT)}"
    assert LAYERS[0] == ("core",) and LAYERS[-1] == ("commands",)


def place(module: str) -> tuple[int, str]:
    """``(layer index, folder)`` of an ``xright_pl`` module, from its folder (``xright_pl.data.chat`` -> ``data``);
    the root's entry points are above every layer."""
    rest = module.removeprefix("xright_pl").removeprefix(".")
    if rest in ("", "__main__"):
        return len(LAYERS), "root"
    head = rest.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if head in layer:
            return i, head
    raise AssertionError(f"{module} is in no folder of ARCHITECTURE.md's map: move it into one, or add its folder")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in graph.items():
        layer, part = place(module)
        for target in targets:
            t_layer, t_part = place(target)
            if t_layer > layer:
                found.append(f"{module} ({part}) imports {target} ({t_part}), a layer above")
            elif t_layer == layer and t_part != part:
                found.append(f"{module} ({part}) imports {target} ({t_part}), a peer part")
    return sorted(found)


def test_layer_checker_catches_upward_and_peer_imports():
    assert layer_violations({"xright_pl.objectives.losses": {"xright_pl.training.module"}}) == [
        "xright_pl.objectives.losses (objectives) imports xright_pl.training.module (training), a layer above"
    ]
    assert layer_violations({"xright_pl.data.sources": {"xright_pl.selectors"}}) == [
        "xright_pl.data.sources (data) imports xright_pl.selectors (selectors), a peer part"
    ]
    assert layer_violations({"xright_pl.core.optimum": {"xright_pl"}}) == [
        "xright_pl.core.optimum (core) imports xright_pl (root), a layer above"
    ]
    assert (
        layer_violations({"xright_pl.training.module": {"xright_pl.objectives.losses", "xright_pl.core.errors"}}) == []
    )


def test_every_module_is_in_a_layer_and_imports_only_downwards():
    graph = import_graph()
    for module in graph:
        place(module)
    assert not layer_violations(graph), "\n".join(layer_violations(graph))
