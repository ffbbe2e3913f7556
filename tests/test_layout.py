"""
The shape of the package, checked: the data path reads in the tree, and no
dependency runs against it.

The spine is C{front -> relay}; C{usage}, C{limits} and C{observe} are side
rooms below it, and C{dialects} (the wire formats) is below everything.
A package imports only the ones below it in L{LAYERS}: so there is no
import cycle, hidden behind C{TYPE_CHECKING} or not.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import zaiproxy

ROOT = Path(zaiproxy.__file__).parent

#: Bottom first; each may import only those before it.
LAYERS = [
    "twistedprivate",
    "dialects",
    "limits",
    "observe",
    "usage",
    "relay",
    "ledger",
    "front",
    "dashboard",
    "config",
    "startup",
    "service",
    "workers",
    "tap",
]
#: The fake Z.AI stands apart: it may use the wire formats, nothing else.
APART = {"fake": {"dialects"}}
MAX_FUNCTION_LINES = 60


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        package = parts[0].removesuffix(".py")
        yield package, ast.parse(path.read_text(), str(path))


def imported(tree: ast.Module) -> Iterator[tuple[str, ast.AST]]:
    """
    The zaiproxy packages a module imports, absolute or relative to itself
    (a relative import stays inside its package).
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] == "zaiproxy" and len(parts) > 1:
                yield parts[1], node
            elif parts[0] == "zaiproxy":
                for alias in node.names:
                    yield alias.name, node
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "zaiproxy" and len(parts) > 1:
                    yield parts[1], node


def test_everyPackageIsPlaced() -> None:
    """
    Each top-level module and sub-package has a place in the layers.
    """
    found = {package for package, _ in modules()} - {"__init__", "__main__"}
    assert found == set(LAYERS) | set(APART)


def test_dependenciesRunDownward() -> None:
    """
    No package imports one above it (or beside it, for the fake).
    """
    wrong = []
    for package, tree in modules():
        if package in ("__init__", "__main__"):
            continue
        allowed = APART.get(package)
        if allowed is None:
            allowed = set(LAYERS[: LAYERS.index(package)])
        for other, node in imported(tree):
            if other not in (package, "__version__") and other not in allowed:
                wrong.append(f"{package} imports {other} (line {getattr(node, 'lineno', '?')})")
    assert wrong == []


def test_noTypeCheckingImports() -> None:
    """
    No import hides behind C{TYPE_CHECKING}: the cycles it hid are gone.
    """
    hidden = [
        package
        for package, tree in modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
    ]
    assert hidden == []


def test_functionsAReaderCanHold() -> None:
    """
    No function of the package is longer than L{MAX_FUNCTION_LINES}.
    """
    long = [
        f"{package}: {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for package, tree in modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []
