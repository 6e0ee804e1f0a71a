"""No import cycle between the modules of converter, edge_agent, gateway and medge.

The graph is read from the source with ``ast`` (nothing is imported): an edge A -> B for every
``import B`` / ``from B import x`` (``from P import m`` where ``P.m`` is a module: an edge to
``P.m``) at module level, where module level includes ``if``/``try`` blocks but not imports
under ``if TYPE_CHECKING:``, which never run. Imports inside a function (lazy imports) run
only when it is called; they are not edges here, but they are counted, and a lazy import that
closes a cycle is listed by :func:`lazy_cycles` for the record.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("converter", "edge_agent", "gateway", "medge")

# Cycles known outside converter/ (each a set of modules in one strongly connected component),
# left to the owners of those packages; an entry that no longer exists fails the test so the
# list only shrinks.
KNOWN: list[frozenset[str]] = []


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


Found = Iterator[tuple[ast.Import | ast.ImportFrom, bool]]


def _imports(tree: ast.Module) -> Found:
    """Every import statement with whether it runs at import time (module level)."""

    def walk(nodes: list[ast.stmt], top: bool) -> Found:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                yield node, top
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from walk(node.body, False)  # type: ignore[arg-type]
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                continue
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    inner = getattr(node, field, None)
                    if isinstance(inner, list):
                        yield from walk([n for n in inner if isinstance(n, ast.AST)], top)  # type: ignore[misc]

    yield from walk(tree.body, True)


def _targets(node: ast.Import | ast.ImportFrom, name: str, modules: set[str]) -> set[str]:
    found = set()
    if isinstance(node, ast.Import):
        bases = [a.name for a in node.names]
        subs: list[str] = []
    else:
        base = node.module or ""
        if node.level:
            pkg = name.split(".")
            if not _is_package(name, modules):
                pkg = pkg[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join([*pkg, base] if base else pkg)
        bases = [base]
        subs = [f"{base}.{a.name}" for a in node.names]
    for b in bases:
        known = b
        while known and known not in modules:
            known = known.rpartition(".")[0]
        if known:
            found.add(known)
    found |= {s for s in subs if s in modules}
    if subs and all(s in modules for s in subs):
        found.discard(bases[0])  # `from P import m`: the module m, not P's own names
    return found - {name}


def _is_package(name: str, modules: set[str]) -> bool:
    return any(m.startswith(name + ".") for m in modules)


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Module-level edges and lazy (function-level) edges between our modules."""
    mods = _modules()
    names = set(mods)
    eager: dict[str, set[str]] = {m: set() for m in mods}
    lazy: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node, top in _imports(tree):
            (eager if top else lazy)[name] |= _targets(node, name, names)
    return eager, lazy


def _reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in edges.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module: the modules each reaches and
    is reached from (a few hundred modules: reachability from each is quick enough)."""
    reach = {v: _reachable(edges, v) for v in edges}
    out: set[frozenset[str]] = set()
    for v, ahead in reach.items():
        comp = frozenset({v} | {w for w in ahead if v in reach.get(w, ())})
        if len(comp) > 1:
            out.add(comp)
    return sorted(out, key=sorted)


def lazy_cycles() -> list[frozenset[str]]:
    """The cycles that lazy imports would close if they were module-level."""
    eager, lazy = graph()
    both = {m: eager[m] | lazy[m] for m in eager}
    return cycles(both)


def test_no_import_cycles() -> None:
    eager, _ = graph()
    found = cycles(eager)
    unknown = [sorted(c) for c in found if c not in KNOWN]
    assert not unknown, f"import cycles: {unknown}"
    gone = [sorted(c) for c in KNOWN if c not in found]
    assert not gone, f"known cycles that are gone (drop them from KNOWN): {gone}"


def test_converter_has_no_cycle_even_through_lazy_imports() -> None:
    eager, lazy = graph()
    conv = {
        m: {t for t in eager[m] | lazy[m] if t.startswith("converter")}
        for m in eager
        if m.startswith("converter")
    }
    assert not cycles(conv), f"converter cycles (lazy imports included): {cycles(conv)}"


def test_the_graph_is_read() -> None:
    eager, _ = graph()
    assert "converter.convert" in eager["converter"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert sum(len(v) for v in eager.values()) > 50
    assert all(
        not m.startswith("converter") for t in eager if t.startswith("edge_agent") for m in eager[t]
    )


if __name__ == "__main__":  # numbers for a report
    e, z = graph()
    print(
        "module-level edges",
        sum(len(v) for v in e.values()),
        "lazy edges",
        sum(len(v) for v in z.values()),
    )
    print("cycles (module level):", [sorted(c) for c in cycles(e)])
    print("cycles (lazy included):", [sorted(c) for c in lazy_cycles()])
    conv = {
        m: {t for t in e[m] | z[m] if t.startswith("converter")}
        for m in e
        if m.startswith("converter")
    }
    print("converter cycles (lazy included):", [sorted(c) for c in cycles(conv)])
    print(
        "converter lazy edges:",
        sum(
            len({t for t in z[m] if t.startswith("converter")})
            for m in z
            if m.startswith("converter")
        ),
    )
