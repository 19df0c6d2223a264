"""The package's import graph is acyclic, counting function-local imports (which would otherwise hide cycles).

Every module of ``zeroshot_kd`` is parsed with :mod:`ast`; each ``import``/``from ... import`` anywhere in it (module
level, inside functions, under ``TYPE_CHECKING``) gives an edge to the package module it names, and to the
subpackages enclosing it (importing ``zeroshot_kd.quant.student`` from outside ``quant`` runs ``quant/__init__.py``,
which re-exports, i.e. imports, its submodules). The top-level ``zeroshot_kd/__init__.py``'s re-exports are left out:
it imports everything by design, and nothing inside the package may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "zeroshot_kd"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that ``name`` imports (the longest known prefix of every imported name)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
            names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for n in names:
            parts = n.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts:
                targets.add(".".join(parts))
    targets.discard(name)
    return targets


def with_parent_packages(name: str, deps: set[str]) -> set[str]:
    """Importing ``pkg.sub.mod`` runs ``pkg.sub``'s ``__init__`` first: an edge to each enclosing subpackage the
    importer is not itself inside (the top-level package excepted)."""
    out = set(deps)
    for t in deps:
        parts = t.split(".")
        for i in range(2, len(parts)):
            pkg = ".".join(parts[:i])
            if not name.startswith(pkg + "."):
                out.add(pkg)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph = {n: with_parent_packages(n, imports_of(n, p, known)) for n, p in mods.items()}
    graph["zeroshot_kd"] = set()  # the re-exports of the top-level __init__ are excluded
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the strongly connected components of ``graph``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
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
                    work.append((w, iter(sorted(graph[w]))))
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
                    comps.append(sorted(comp))
    return comps


def test_scc_finds_a_known_cycle():
    """The checker itself: a 3-cycle plus a tail gives one component of size 3 (brute force: reachability)."""
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}}
    comps = sorted(strongly_connected(g), key=len)
    assert comps[-1] == ["a", "b", "c"] and all(len(c) == 1 for c in comps[:-1])


def test_relative_imports_resolve_including_local_ones(tmp_path):
    """Edges from a function-local relative import and a ``from . import sub`` are found."""
    known = {"zeroshot_kd", "zeroshot_kd.quant", "zeroshot_kd.quant.student", "zeroshot_kd.evaluate"}
    got = imports_of("zeroshot_kd.loading", PKG / "loading.py", set(modules()))
    assert {"zeroshot_kd.quant.student", "zeroshot_kd.teachers", "zeroshot_kd.export.runtime"} <= got
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from .quant import student\n    from . import evaluate\n")
    # treat the temporary file as zeroshot_kd.m
    assert imports_of("zeroshot_kd.m", f, known) == {"zeroshot_kd.quant.student", "zeroshot_kd.evaluate"}


def test_a_submodule_import_runs_its_package():
    """``evaluate -> quant.student`` also runs ``quant/__init__`` (which imports the training loop): an edge."""
    assert with_parent_packages("zeroshot_kd.evaluate", {"zeroshot_kd.quant.student"}) == {
        "zeroshot_kd.quant.student", "zeroshot_kd.quant"}
    assert with_parent_packages("zeroshot_kd.quant.pipeline", {"zeroshot_kd.quant.student"}) == {
        "zeroshot_kd.quant.student"}


def test_package_import_graph_is_acyclic():
    graph = import_graph()
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    assert not cycles, "import cycles (function-local imports count): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_module_imports_the_package_init():
    """Submodules take ``__version__`` from ``version.py``, never from the package (which imports them)."""
    offenders = sorted(n for n, deps in import_graph().items() if "zeroshot_kd" in deps)
    assert not offenders
