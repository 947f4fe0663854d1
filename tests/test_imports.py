"""The import graph of ``lit_prune``: no cycles, and no function-level import that hides one.

Read statically from the sources (``ast``), so the checks do not depend on which module happens to be imported first
(the root package imports most of them, which would mask an order-dependent cycle at run time). Importing
``lit_prune.a.b`` also runs ``lit_prune/a/__init__.py``; those edges count (the root package's do not: every module
is under it).
"""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lit_prune"

LAZY_OK = {
    ("lit_prune.cli", "lit_prune.demo"): "start-up time: only `lit-prune demo` needs it",
}
"""Function-level ``lit_prune`` imports that are allowed, and why. Such an import must never hide a cycle."""


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The ``lit_prune`` modules an import statement loads (``from pkg import sub`` loads ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if node.module else package
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return [t for t in (_resolve(n) for n in names if n.startswith("lit_prune")) if t is not None]


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """``({module: modules it imports at top level}, [(module, target, line) of function-level imports])``."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    lazy: list[tuple[str, str, int]] = []
    for module, path in MODULES.items():

        def walk(node: ast.AST, in_function: bool, module: str = module) -> None:
            for child in ast.iter_child_nodes(node):
                nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue  # annotations only
                if isinstance(child, ast.Import | ast.ImportFrom):
                    for target in _targets(module, child):
                        if nested:
                            lazy.append((module, target, child.lineno))
                            continue
                        edges[module].add(target)
                        parts = target.split(".")
                        for i in range(2, len(parts)):  # the packages it runs first, except the importer's own
                            package = ".".join(parts[:i])
                            if module != package and not module.startswith(package + "."):
                                edges[module].add(package)
                walk(child, nested)

        walk(ast.parse(path.read_text()), False)
    for targets in edges.values():
        targets.discard("lit_prune")
    return edges, lazy


def _path(edges: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A chain of top-level imports from ``start`` to ``goal``, or None."""
    before: dict[str, str] = {}
    todo, seen = [start], {start}
    while todo:
        node = todo.pop(0)
        if node == goal:
            chain = [goal]
            while chain[-1] != start:
                chain.append(before[chain[-1]])
            return chain[::-1]
        for nxt in sorted(edges[node]):
            if nxt not in seen:
                seen.add(nxt)
                before[nxt] = node
                todo.append(nxt)
    return None


def test_the_graph_sees_top_level_and_function_level_imports():
    """The checks below can fail: the reader finds the edges they are about."""
    edges, lazy = _graph()
    assert "lit_prune.sparse.masks" in edges["lit_prune.io"]
    assert "lit_prune.sparse" in edges["lit_prune.io"]  # importing sparse.masks runs sparse/__init__.py
    assert ("lit_prune.cli", "lit_prune.demo") in {(m, t) for m, t, _ in lazy}
    assert _path(edges, "lit_prune.loading", "lit_prune.sparse.masks") is not None


def test_top_level_imports_have_no_cycle():
    edges, _ = _graph()
    cycles: dict[frozenset[str], str] = {}  # one line per set of modules in a cycle
    for module in sorted(edges):
        for target in sorted(edges[module]):
            back = _path(edges, target, module)
            if back is not None:
                cycles.setdefault(frozenset(back), " -> ".join([module, *back]))
    cycles = {k: v for k, v in cycles.items() if not any(k > other for other in cycles)}  # the shortest ones
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles.values()))


def test_no_function_level_import_hides_a_cycle():
    """Made top-level, no function-level import would close a cycle (with the other function-level ones, too)."""
    edges, lazy = _graph()
    for module, target, _ in lazy:
        edges[module].add(target)
    hidden = []
    for module, target, line in lazy:
        back = _path(edges, target, module)
        if back is not None:
            hidden.append(f"{MODULES[module].relative_to(ROOT.parent)}:{line} imports {target}: {' -> '.join(back)}")
    assert not hidden, "move the shared piece down instead of importing in a function:\n" + "\n".join(hidden)


def test_function_level_imports_are_justified():
    _, lazy = _graph()
    unlisted = sorted(
        f"{MODULES[m].relative_to(ROOT.parent)}:{line} imports {t}" for m, t, line in lazy if (m, t) not in LAZY_OK
    )
    assert not unlisted, "import at top level, or add the pair to LAZY_OK with the reason:\n" + "\n".join(unlisted)


@pytest.mark.parametrize("seed", [0, 1])
def test_every_module_imports_in_a_fresh_interpreter_in_random_order(seed):
    names = sorted(MODULES)
    random.Random(seed).shuffle(names)
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


PASS_RUNNERS = ("collect_", "run_pass", "hooked_pass", "sequential_pass")
"""Names of the functions that run calibration passes (``lit_prune.stats``)."""


def test_criteria_are_pure_only_scoring_runs_passes():
    """Criteria modules score statistics; only ``criteria.scoring`` imports what runs a pass (issue 15, item 3)."""
    offenders = []
    for module, path in sorted(MODULES.items()):
        if not module.startswith("lit_prune.criteria.") or module == "lit_prune.criteria.scoring":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("lit_prune.stats"):
                continue
            if node.module in ("lit_prune.stats.engine", "lit_prune.stats.collect"):
                offenders.append(f"{module} imports {node.module}")
            for alias in node.names:
                if alias.name.startswith(PASS_RUNNERS):
                    offenders.append(f"{module} imports {alias.name} from {node.module}")
    scoring = ast.parse(MODULES["lit_prune.criteria.scoring"].read_text())
    imported = {a.name for n in ast.walk(scoring) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {"collect_statistics", "collect_width_statistics"} <= imported  # the check sees real imports
    assert not offenders, "\n".join(offenders)
