"""Check the layout rules of docs/architecture.md by reading the source (no imports run).

- no import cycle between top-level parts of ``rtserve`` (a subpackage or a top-level module);
- the lower layers (``errors``, ``paths``, ``tensors``, ``backends``, ``executors``, ``batching``, ``llm``)
  import nothing from ``models``, ``repository``, ``server`` or ``cli``;
- no module over ``MAX_MODULE_LINES`` lines, no function over ``MAX_FUNCTION_LINES`` lines.

Imports inside functions count: a lazy import is still a dependency. Prints every violation and
exits 1 when there is one: ``python scripts/check_layout.py [src/rtserve]``.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
LOWER = ("errors", "paths", "tensors", "backends", "executors", "batching", "llm")
UPPER = ("models", "repository", "server", "cli")


def _part(pkg_root: Path, path: Path) -> str:
    rel = path.relative_to(pkg_root)
    return rel.parts[0].removesuffix(".py")


def _resolve(path: Path, pkg_root: Path, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The top-level rtserve parts an import statement names."""
    out = []
    if isinstance(node, ast.Import):
        for a in node.names:
            parts = a.name.split(".")
            if parts[0] == "rtserve" and len(parts) > 1:
                out.append(parts[1])
        return out
    if node.level == 0:
        parts = (node.module or "").split(".")
        if parts[0] != "rtserve":
            return out
        rest = parts[1:]
    else:
        here = list(path.relative_to(pkg_root).parent.parts)
        up = here[:len(here) - (node.level - 1)] if node.level > 1 else here
        rest = up + ((node.module or "").split(".") if node.module else [])
    if rest:
        out.append(rest[0])
    else:  # from . import x, y (at the package root)
        out.extend(a.name for a in node.names)
    return out


def import_graph(pkg_root: Path) -> dict[str, dict[str, set[str]]]:
    """part -> imported part -> the files that import it."""
    graph: dict[str, dict[str, set[str]]] = {}
    for path in sorted(pkg_root.rglob("*.py")):
        src = _part(pkg_root, path)
        if src == "__init__":
            continue
        graph.setdefault(src, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for dst in _resolve(path, pkg_root, node):
                    if dst != src and dst != "__init__":
                        graph[src].setdefault(dst, set()).add(str(path.relative_to(pkg_root)))
    return graph


def cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """Strongly connected components with more than one part (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def violations(pkg_root: Path) -> list[str]:
    pkg_root = Path(pkg_root)
    graph = import_graph(pkg_root)
    found = []
    for comp in cycles(graph):
        edges = [f"{a} -> {b} ({', '.join(sorted(graph[a][b]))})" for a in comp for b in graph[a] if b in comp]
        found.append("import cycle between " + ", ".join(comp) + ": " + "; ".join(edges))
    for low in LOWER:
        for up in UPPER:
            if up in graph.get(low, {}):
                found.append(f"lower layer '{low}' imports '{up}' ({', '.join(sorted(graph[low][up]))})")
    for path in sorted(pkg_root.rglob("*.py")):
        text = path.read_text()
        n = len(text.splitlines())
        rel = path.relative_to(pkg_root)
        if n > MAX_MODULE_LINES:
            found.append(f"{rel}: {n} lines (limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    found.append(f"{rel}:{node.lineno}: function {node.name} has {size} lines "
                                 f"(limit {MAX_FUNCTION_LINES})")
    return found


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "src" / "rtserve"
    found = violations(root)
    for v in found:
        print(v)
    print(f"{len(found)} layout violation(s) in {root}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
