"""Structure figures of a checkout's ``ray_lt/``: the longest functions, the modules over a line
budget, and the import cycles.

Used to measure a restructuring before and after (``git worktree add /tmp/before REV``, then run
this on both trees). Imports are read from the source (``ast``), function-level ones included,
so a cycle that only a deferred import hides still shows.

    python bench/code_metrics.py [ROOT] [--budget 400] [--top 3]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module under ``root/ray_lt``."""
    out = {}
    for path in sorted((root / "ray_lt").rglob("*.py")):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports_of(tree: ast.AST, known: dict[str, Path]) -> set[str]:
    """The project modules a module imports, anywhere in its body."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in known:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found & set(known)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            comp.append(v)
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default=".", help="the checkout (default: here)")
    p.add_argument("--budget", type=int, default=400, help="lines a module may have")
    p.add_argument("--top", type=int, default=3, help="how many longest functions to list")
    args = p.parse_args(argv)
    root = Path(args.root)
    known = modules(root)
    graph, lengths, over = {}, [], []
    for name, path in known.items():
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        graph[name] = imports_of(tree, known)
        rel = path.relative_to(root)
        if (n := source.count("\n")) > args.budget:
            over.append((n, str(rel)))
        lengths += [
            (node.end_lineno - node.lineno + 1, f"{rel}:{node.name}")
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        ]
    print(
        "longest functions:", ", ".join(f"{w} ({n})" for n, w in sorted(lengths)[::-1][: args.top])
    )
    print(
        f"modules over {args.budget} lines:",
        ", ".join(f"{w} ({n})" for n, w in sorted(over)[::-1]),
    )
    print("import cycles:", "; ".join(" <-> ".join(c) for c in cycles(graph)) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
