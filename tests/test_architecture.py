"""Import architecture of lightning_quant, read from the source with ``ast`` (nothing is imported).

The graph: one node per module of the package, one edge per module-level ``import`` of another module of the
package (``from lightning_quant.x import y`` points at ``lightning_quant.x.y`` when that is a module, else at
``lightning_quant.x``). A package ``__init__`` is its own node: its re-exports are its edges, and importing a
name from a package is an edge to the ``__init__`` only. Imports under ``if TYPE_CHECKING:`` never run and are
left out; imports inside a function body are "local".

Checked:

* no cycle among the modules, leaving out package ``__init__`` nodes (their re-exports may close loops);
* every local import of a package module ``X`` inside module ``M`` is a plain lazy import, not a hidden upward
  dependency: ``M`` must not be reachable from ``X`` through module-level imports (else ``M`` and ``X`` depend on
  each other and the local import only hides the cycle). Optional third-party backends imported lazily are fine
  and not checked;
* no cycle either once local imports count as edges (package ``__init__`` nodes and the allow-list left out): two
  local imports must not hide a cycle between them (as ``export.torchscript`` <-> ``export.verify`` once did);
* every import of a package module names a module that exists.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "lightning_quant"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

# Local imports known to be hidden upward dependencies, as (importing module, imported module), each with the
# module-level path that closes the loop. Fix the import, then delete the entry.
ALLOWED_UPWARD_LOCAL_IMPORTS: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    local: bool


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULE_FILES = {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}
PACKAGES = {_module_name(p) for p in MODULE_FILES.values() if p.name == "__init__.py"}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, module: str) -> None:
        self.module = module
        self.imports: list[Import] = []
        self.unresolved: list[str] = []
        self._depth = 0

    def _function(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        for child in node.orelse:
            self.visit(child)

    def _add(self, target: str, line: int) -> None:
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            if target not in MODULE_FILES:
                self.unresolved.append(f"{self.module}:{line} imports {target}, which is not a module")
                return
            self.imports.append(Import(self.module, target, line, local=self._depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: resolved against the importing module's package
            package = self.module if self.module in PACKAGES else self.module.rpartition(".")[0]
            anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            base = f"{anchor}.{base}" if base else anchor
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            self._add(candidate if candidate in MODULE_FILES else base, node.lineno)


def _collect() -> tuple[list[Import], list[str]]:
    imports: list[Import] = []
    unresolved: list[str] = []
    for module, path in MODULE_FILES.items():
        collector = _ImportCollector(module)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        imports += collector.imports
        unresolved += collector.unresolved
    return imports, unresolved


IMPORTS, UNRESOLVED = _collect()


def module_graph(*, skip_packages: bool = False, with_local: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports at module level (optionally without package ``__init__`` nodes, or
    with the local imports too, less the allow-listed ones)."""
    nodes = [m for m in MODULE_FILES if not (skip_packages and m in PACKAGES)]
    graph: dict[str, set[str]] = {m: set() for m in nodes}
    for imp in IMPORTS:
        if imp.local and (not with_local or (imp.source, imp.target) in ALLOWED_UPWARD_LOCAL_IMPORTS):
            continue
        if imp.source in graph and imp.target in graph and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph[node]):
            if nxt in on_path:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in done and (cycle := visit(nxt)) is not None:
                return cycle
        on_path.discard(path.pop())
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)) is not None:
            return cycle
    return None


def path_between(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A shortest import path ``start -> ... -> goal`` in ``graph``, or None when ``goal`` is not reachable."""
    parent: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            chain = [node]
            while (prev := parent[chain[-1]]) is not None:
                chain.append(prev)
            return chain[::-1]
        for nxt in sorted(graph[node]):
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return None


def upward_local_imports() -> list[tuple[Import, list[str]]]:
    """Every local import ``M -> X`` with ``M`` reachable from ``X``, with the module-level path ``X -> ... -> M``."""
    graph = module_graph()
    found = []
    for imp in IMPORTS:
        if imp.local and imp.target != imp.source and (chain := path_between(graph, imp.target, imp.source)):
            found.append((imp, chain))
    return found


def test_the_package_is_parsed():
    assert {"lightning_quant.config", "lightning_quant.quantizers.observers"} <= set(MODULE_FILES)
    assert any(not imp.local for imp in IMPORTS) and any(imp.local for imp in IMPORTS)


def test_every_package_import_names_a_module():
    assert not UNRESOLVED, "\n".join(UNRESOLVED)


def test_no_module_level_import_cycle():
    cycle = find_cycle(module_graph(skip_packages=True))
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_counting_local_imports():
    cycle = find_cycle(module_graph(skip_packages=True, with_local=True))
    assert cycle is None, "import cycle (local imports included): " + " -> ".join(cycle or [])


def test_local_imports_are_not_hidden_upward_dependencies():
    found = upward_local_imports()
    violations = [
        f"{imp.source}:{imp.line} imports {imp.target} inside a function, but {' -> '.join(chain)} at module level"
        for imp, chain in found
        if (imp.source, imp.target) not in ALLOWED_UPWARD_LOCAL_IMPORTS
    ]
    assert not violations, "hidden upward dependencies:\n" + "\n".join(violations)


def test_allow_list_entries_are_still_needed():
    live = {(imp.source, imp.target) for imp, _ in upward_local_imports()}
    stale = ALLOWED_UPWARD_LOCAL_IMPORTS - live
    assert not stale, f"fixed: delete from ALLOWED_UPWARD_LOCAL_IMPORTS: {sorted(stale)}"


def test_the_checks_catch_what_they_should():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert path_between({"x": {"y"}, "y": {"m"}, "m": set()}, "x", "m") == ["x", "y", "m"]
    assert path_between({"x": set(), "m": {"x"}}, "x", "m") is None
