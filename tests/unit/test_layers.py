"""The package's floors, read from the source with ``ast``: who may import whom.

Every module under ``servekit/`` and ``handlers/`` is parsed (nothing is imported) and each import is
an edge of the module graph, with its file and line and whether it runs when the module is imported
("module level": the module body, class bodies, ``if``/``try`` blocks) or only when a function runs.
``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``.

    servekit/cli.py                       the servekit command: the top, imported by nobody inside
    servekit/deploy/   (and rollout/)     workflows, state, proxy, rollout, bundle
    servekit/observe/                     metrics sources, drift, top
    servekit/serving/                     the processes we run, the store, the TorchServe client
    servekit/errors.py, files.py, ...     the ground floor every room may use
    servekit/build/, servekit/perf/       the torch side: may use the operator rooms, never the reverse
    handlers/                             runs inside TorchServe workers: imports no servekit

The checks: (a) no import cycle among servekit modules, function-level imports included (an import
inside a function hides a cycle, it does not break it); (b) nothing inside a subpackage imports
``servekit.cli``; (c) nothing the operator side loads at import time (``servekit.cli``, ``deploy``,
``serving``, ``observe``, followed through every module-level import) reaches ``servekit.build``,
``servekit.perf`` or torch: ``servekit --help`` stays fast; (d) ``handlers/`` imports no servekit;
(e) the operator rooms import only downward: serving never imports observe or deploy, observe never
imports deploy. A failure names each offending edge as ``importer -> imported (file:line)``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("servekit", "handlers")
OPERATOR_ROOMS = ("servekit.cli", "servekit.deploy", "servekit.serving", "servekit.observe")
TORCH_SIDE = ("servekit.build", "servekit.perf", "torch", "torchvision")
# Each operator room may import only the rooms after it in this list (and the ground floor).
ROOM_ORDER = ("servekit.cli", "servekit.deploy", "servekit.observe", "servekit.serving")


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    path: str  # relative to the repository
    line: int
    module_level: bool

    def __str__(self) -> str:
        where = "" if self.module_level else ", in a function"
        return f"{self.importer} -> {self.imported} ({self.path}:{self.line}{where})"


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> tuple[set[str], list[Edge]]:
    """Every module under ``packages`` in ``root`` and every import edge out of them.

    Edges go to the project's own modules, or to a third-party top-level name (``torch``, ``yaml``).
    """
    files = {module_name(root, path): path for package in packages for path in sorted((root / package).rglob("*.py"))}
    modules = set(files)
    edges = []
    for importer, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, module_level in _imports(tree):
            for target in _targets(node, importer, is_package, modules):
                edges.append(Edge(importer, target, path.relative_to(root).as_posix(), node.lineno, module_level))
    return modules, edges


def _imports(tree: ast.AST) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement, and whether it runs when the module is imported."""
    stack: list[tuple[ast.AST, bool]] = [(tree, True)]
    while stack:
        node, module_level = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, module_level
            inside = module_level and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            stack.append((child, inside))


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [_known(alias.name, modules) for alias in node.names]
    base = node.module or ""
    if node.level:
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    found = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
    if len(found) < len(node.names):  # some names are attributes of ``base`` itself
        found.append(_known(base, modules))
    return found


def _known(name: str, modules: set[str]) -> str:
    """``name`` if it is one of ours; else its longest prefix that is, or its top-level name (third party)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return parts[0]


def cycles(modules: set[str], edges: list[Edge]) -> list[tuple[list[Edge], set[str]]]:
    """Each strongly connected group of modules (Tarjan), self-imports included, with one cycle through it."""
    out: dict[str, list[Edge]] = {m: [] for m in modules}
    for edge in edges:
        if edge.imported in modules:
            out[edge.importer].append(edge)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(start: str) -> None:  # iterative: a deep chain must not hit the recursion limit
        work = [(start, iter(out[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, pending = work[-1]
            for edge in pending:
                nxt = edge.imported
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(out[nxt])))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    if len(group) > 1 or any(e.imported == node for e in out[node]):
                        groups.append(group)

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return [(_cycle_in(sorted(group)[0], group, out), group) for group in groups]


def _cycle_in(start: str, group: set[str], out: dict[str, list[Edge]]) -> list[Edge]:
    """The shortest path from ``start`` back to itself inside ``group`` (breadth first)."""
    paths: dict[str, list[Edge]] = {start: []}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for edge in out[node]:
            if edge.imported == start:
                return [*paths[node], edge]
            if edge.imported in group and edge.imported not in paths:
                paths[edge.imported] = [*paths[node], edge]
                queue.append(edge.imported)
    raise AssertionError(f"no cycle through {start}")  # a group of Tarjan's always has one


def loaded_at_import(module: str, edges: list[Edge]) -> dict[str, list[Edge]]:
    """Every module (or third-party top-level name) importing ``module`` loads, with the chain of edges to it."""
    out: dict[str, list[Edge]] = {}
    for edge in edges:
        if edge.module_level:
            out.setdefault(edge.importer, []).append(edge)
    chains: dict[str, list[Edge]] = {module: []}
    queue = [module]
    while queue:
        node = queue.pop(0)
        for edge in out.get(node, []):
            if edge.imported not in chains:
                chains[edge.imported] = [*chains[node], edge]
                queue.append(edge.imported)
    return chains


def _report(title: str, lines: Iterable[str]) -> str:
    return "\n".join([title, *(f"  {line}" for line in lines)])


# ------------------------------------------------------------------------------------------ the checks
@pytest.fixture(scope="module")
def graph() -> tuple[set[str], list[Edge]]:
    modules, edges = import_graph(REPO_ROOT)
    assert {"servekit.cli", "servekit.deploy.rollout", "servekit.serving.server", "handlers.base"} <= modules
    return modules, edges


def test_no_import_cycles_among_servekit_modules(graph: tuple[set[str], list[Edge]]) -> None:
    modules, edges = graph
    ours = {m for m in modules if within(m, ["servekit"])}
    found = cycles(ours, [e for e in edges if e.importer in ours])
    if found:
        pytest.fail(_report(
            f"{len(found)} group(s) of servekit modules import each other (function-level imports count: "
            "they hide a cycle, they do not break it); one cycle of each:",
            (f"{' then '.join(map(str, cycle))}  [all in the group: {', '.join(sorted(group))}]"
             for cycle, group in found),
        ))  # fmt: skip


def test_nothing_inside_a_subpackage_imports_the_cli(graph: tuple[set[str], list[Edge]]) -> None:
    _, edges = graph
    inside = [e for e in edges if e.path.startswith("servekit/") and e.path.count("/") >= 2]  # servekit/ROOM/...
    upward = [e for e in inside if within(e.imported, ["servekit.cli", "servekit.serve"])]
    if upward:
        pytest.fail(_report("servekit.cli and servekit.serve (make serve) are the top: nothing below them "
                            "imports them:", map(str, upward)))  # fmt: skip


def test_the_operator_side_loads_neither_the_build_nor_perf_nor_torch(graph: tuple[set[str], list[Edge]]) -> None:
    modules, edges = graph
    offences: dict[Edge, list[list[Edge]]] = {}  # each edge into the torch side -> the chains that reach it
    for module in sorted(m for m in modules if within(m, OPERATOR_ROOMS)):
        for reached, chain in sorted(loaded_at_import(module, edges).items()):
            if chain and within(reached, TORCH_SIDE) and not within(chain[-1].importer, TORCH_SIDE):
                offences.setdefault(chain[-1], []).append(chain)
    if offences:
        pytest.fail(_report(
            "importing the operator side (servekit --help) must not load the torch side:",
            (f"{edge}: loaded by {len(chains)} operator module(s), e.g. {' then '.join(map(str, min(chains, key=len)))}"
             for edge, chains in offences.items()),
        ))  # fmt: skip


def test_handlers_import_no_servekit(graph: tuple[set[str], list[Edge]]) -> None:
    _, edges = graph
    found = [e for e in edges if within(e.importer, ["handlers"]) and within(e.imported, ["servekit"])]
    if found:
        pytest.fail(_report("handlers/ runs inside TorchServe workers and imports no servekit:", map(str, found)))


def test_the_operator_rooms_import_only_downward(graph: tuple[set[str], list[Edge]]) -> None:
    _, edges = graph

    def room(name: str) -> int | None:
        return next((i for i, r in enumerate(ROOM_ORDER) if within(name, [r])), None)

    upward = [
        e for e in edges if None not in (room(e.importer), room(e.imported)) and room(e.imported) < room(e.importer)
    ]
    if upward:
        pytest.fail(_report(f"rooms import only downward ({' > '.join(ROOM_ORDER)}):", map(str, upward)))


# ------------------------------------------------------------------------------------------ the checks can fail
def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_cycle_hidden_in_a_function_is_found_and_named(tmp_path: Path) -> None:
    write_package(tmp_path, {
        "servekit/__init__.py": "",
        "servekit/build/__init__.py": "",
        "servekit/build/spec.py": "def keys():\n    from servekit.build.tasks import KEYS\n    return KEYS\n",
        "servekit/build/tasks.py": "from . import training\nKEYS = 1\n",
        "servekit/build/training.py": "from servekit.build.spec import keys\n",
        "servekit/build/other.py": "import servekit.build.spec\n",
    })  # fmt: skip
    modules, edges = import_graph(tmp_path, ["servekit"])
    found = cycles(modules, edges)
    assert [([str(e) for e in cycle], sorted(group)) for cycle, group in found] == [([
        "servekit.build.spec -> servekit.build.tasks (servekit/build/spec.py:2, in a function)",
        "servekit.build.tasks -> servekit.build.training (servekit/build/tasks.py:1)",
        "servekit.build.training -> servekit.build.spec (servekit/build/training.py:1)",
    ], ["servekit.build.spec", "servekit.build.tasks", "servekit.build.training"])]  # fmt: skip


def test_a_torch_import_two_modules_down_is_traced_to_the_operator_module(tmp_path: Path) -> None:
    write_package(tmp_path, {
        "servekit/__init__.py": "",
        "servekit/deploy/__init__.py": "",
        "servekit/deploy/state.py": "from servekit.serving.store import NAME\n",
        "servekit/serving/__init__.py": "",
        "servekit/serving/store.py": "import torch.nn\nNAME = 1\n\ndef later():\n    import servekit.build.spec\n",
    })  # fmt: skip
    _, edges = import_graph(tmp_path, ["servekit"])
    chains = loaded_at_import("servekit.deploy.state", edges)
    assert " then ".join(map(str, chains["torch"])) == (
        "servekit.deploy.state -> servekit.serving.store (servekit/deploy/state.py:1) then "
        "servekit.serving.store -> torch (servekit/serving/store.py:1)"
    )
    assert "servekit.build.spec" not in chains  # a function-level import runs only when called
