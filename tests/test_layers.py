"""The layers of docs/architecture.md hold: no lower layer imports an upper one, and no import cycle.

The layers are the import-linter contract in pyproject.toml (written per package, so moving a file
inside a package changes nothing). Only imports that run count: those under ``if TYPE_CHECKING:``
are left out, as they never execute.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import grimp
import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("headmap", exclude_type_checking_imports=True, cache_dir=None)


def test_import_linter_contract_is_kept(capsys):
    code = lint_imports(config_filename=str(PYPROJECT), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out  # import-linter's report names the illegal import chain


def test_contract_places_every_package(graph):
    """A new package of headmap needs a row in docs/architecture.md and a layer in pyproject.toml."""
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    named = {name.strip().strip("()") for layer in layers for name in layer.replace("|", ":").split(":")}
    packages = {".".join(m.split(".")[:2]) for m in graph.modules if m != "headmap"}
    assert packages <= named, f"packages without a layer in pyproject.toml: {sorted(packages - named)}"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (or a self-import): Tarjan, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1 or node in edges.get(node, ()):
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules(graph):
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _cycles(edges) == [], "import cycles between modules of headmap (break them; see docs/architecture.md)"


def test_no_import_cycle_between_packages(graph):
    """atlas -> report -> atlas through different modules is a cycle too, even when no module closes it."""

    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    edges: dict[str, set[str]] = {}
    for m in graph.modules:
        edges.setdefault(package(m), set()).update(
            package(i) for i in graph.find_modules_directly_imported_by(m) if package(i) != package(m)
        )
    assert _cycles(edges) == [], "import cycles between packages of headmap"
