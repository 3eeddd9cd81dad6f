#!/usr/bin/env python3
"""The package's import graph, bottom floor first, with any import cycle and any import inside a function.

    python tools/import_graph.py

A module's floor is one above the highest module it imports; floor 1 imports none of the package. A cycle, or a
package module imported inside a function, is printed and makes the exit status 1 (tests/test_layers.py runs it).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / 'mnv_train'


def own_imports(node: ast.AST, module: str) -> set[str]:
    """Package modules that an import statement names ('from . import data', 'from .build import Run')."""
    if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or '').startswith('mnv_train')):
        base = (node.module or '').removeprefix('mnv_train').lstrip('.')
        if base:
            return {base.split('.')[0]}
        return {alias.name for alias in node.names if (PACKAGE / f'{alias.name}.py').is_file()}
    if isinstance(node, ast.Import):
        return {alias.name.split('.')[1] for alias in node.names if alias.name.startswith('mnv_train.')}
    return set()


def read_graph() -> tuple[dict[str, set[str]], list[str]]:
    """({module: package modules it imports at module level}, ['module:line imports x inside a function'])."""
    graph, inside = {}, []
    for path in sorted(PACKAGE.glob('*.py')):
        module = path.stem
        tree = ast.parse(path.read_text())
        graph[module] = set().union(*(own_imports(node, module) for node in tree.body)) - {module}
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                for name in own_imports(node, module):
                    inside.append(f'{module}:{node.lineno} imports {name} inside {function.name}()')
    return graph, inside


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """1 + the highest floor a module imports from (only meaningful without cycles)."""
    memo: dict[str, int] = {}

    def floor(node, seen=()):
        if node not in memo:
            below = [floor(t, seen + (node,)) for t in graph.get(node, ()) if t not in seen]
            memo[node] = 1 + max(below, default=0)
        return memo[node]
    return {node: floor(node) for node in graph}


def main() -> int:
    graph, inside = read_graph()
    level = floors(graph)
    for number in sorted(set(level.values())):
        for module in sorted(m for m in graph if level[m] == number):
            imports = ', '.join(sorted(graph[module])) or '-'
            print(f'floor {number:2d}  {module:15s} imports {imports}')
    loops = cycles(graph)
    for group in loops:
        print(f'CYCLE: {" <-> ".join(group)}')
    for line in inside:
        print(f'FUNCTION-LEVEL IMPORT: {line}')
    return 1 if loops or inside else 0


if __name__ == '__main__':
    sys.exit(main())
