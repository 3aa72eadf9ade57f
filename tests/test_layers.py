"""The import layers of docs/architecture.md, enforced: a module never imports from a layer
above its own, and no set of modules imports itself in a circle (imports inside functions
count too: a hidden import is still an arrow)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "actors", "telemetry", "experiments", "dashboard", "cli")

# the actor runtime: actors, messages, names, topics, supervision; it knows no events or workloads
RUNTIME = {"log", "files", "messages", "base", "registry", "topics", "snapshot", "supervision", "runtime", "timers"}

# lowest first; see docs/architecture.md for why each layer sits where it does
LAYERS = ("kernels", "actor runtime", "telemetry", "standard actors", "experiments", "dashboard", "cli", "supervisor")


def layer_of(module: str) -> str:
    parts = module.split(".")
    top = parts[0]
    if top == "actors":
        if len(parts) == 1 or parts[1] in RUNTIME:
            return "actor runtime"
        return "standard actors"
    if top == "supervisor":
        return "supervisor"
    return top


def project_modules() -> dict[str, Path]:
    found = {"supervisor": ROOT / "supervisor.py"}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports (``from a.b import c`` counts as a.b.c when that is a module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            names = [n if n in modules else node.module for n in names]
        else:
            continue
        out.update(n for n in names if n in modules)
    return out


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def test_every_package_module_has_a_layer():
    for m in project_modules():
        assert layer_of(m) in LAYERS, m


def test_no_module_imports_from_a_higher_layer():
    upward = sorted(
        f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})"
        for m, targets in graph().items()
        for t in targets
        if LAYERS.index(layer_of(t)) > LAYERS.index(layer_of(m))
    )
    assert upward == []


def strongly_connected(g: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module are import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(g):
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(g.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_there_is_no_import_circle():
    assert strongly_connected(graph()) == []


def test_the_circle_finder_finds_circles():
    """The checker itself: a circle of three and a self-contained chain."""
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(g) == [["a", "b", "c"]]
    assert strongly_connected({"x": {"y"}, "y": set()}) == []


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """A kernel that imported the actor runtime would be reported."""
    f = tmp_path / "k.py"
    f.write_text("def f():\n    from actors.log import get_logger\n")
    targets = imports_of(f, {"actors.log": Path(), "actors": Path()})
    assert targets == {"actors.log"}
    assert LAYERS.index(layer_of("actors.log")) > LAYERS.index(layer_of("kernels.x"))
