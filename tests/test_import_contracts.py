"""The package's shape, kept by tests (as ``test_policy_purity.py`` keeps the core pure): imports point one way
(``mesh`` builds the shells, the shells run on ``runtime``), no cycle hides behind a function-level import, no
underscore name is another module's API, one class name means one class, and the pure core loads no client
library."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Modules below the façade: none of them may import ``meshlib.mesh`` (the composition root builds them).
SHELL_PACKAGES = ("client", "grpc", "policy", "rules", "discovery", "security", "telemetry", "control")
SHELL_MODULES = ("runtime", "inbound", "server", "serving", "mirror", "endpoints", "errors", "settings", "propagation")


@dataclass
class Graph:
    modules: dict[str, Path] = field(default_factory=dict)
    #: importer -> imported, with the line and whether the import is inside a function
    edges: dict[str, set[tuple[str, int, bool]]] = field(default_factory=lambda: defaultdict(set))
    #: (importer, name, source module) for ``from m import _name``
    underscored: list[tuple[str, str, str]] = field(default_factory=list)


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    package = parts[-1] == "__init__"
    if package:
        parts = parts[:-1]
    return ".".join(parts), package


def _graph() -> Graph:
    graph = Graph()
    packages: dict[str, bool] = {}
    for path in sorted((SRC / "meshlib").rglob("*.py")):
        name, package = _module_name(path)
        graph.modules[name] = path
        packages[name] = package

    def resolve(importer: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = importer.split(".")
        if not packages[importer]:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join([*base, *([node.module] if node.module else [])])

    for importer, path in graph.modules.items():
        tree = ast.parse(path.read_text(), str(path))

        def visit(nodes: list[ast.stmt], in_function: bool, importer: str = importer) -> None:
            for node in nodes:
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    continue  # annotations only: never executed
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.startswith("meshlib"):
                            graph.edges[importer].add((alias.name, node.lineno, in_function))
                elif isinstance(node, ast.ImportFrom):
                    source = resolve(importer, node)
                    if not source.startswith("meshlib"):
                        continue
                    for alias in node.names:
                        target = f"{source}.{alias.name}"
                        graph.edges[importer].add(
                            (target if target in graph.modules else source, node.lineno, in_function)
                        )
                        if alias.name.startswith("_") and not alias.name.startswith("__"):
                            graph.underscored.append((importer, alias.name, source))
                inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                for attr in ("body", "orelse", "finalbody", "handlers"):
                    children = getattr(node, attr, None)
                    if isinstance(children, list) and children and isinstance(children[0], ast.AST):
                        visit(children, inner)

        visit(tree.body, False)
    return graph


GRAPH = _graph()


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(GRAPH.modules):
        if module not in index:
            connect(module)
    return found


def test_the_import_graph_has_no_cycle_even_through_function_level_imports() -> None:
    edges = {
        importer: {target for target, _, _ in targets if target in GRAPH.modules and target != importer}
        for importer, targets in GRAPH.edges.items()
    }
    # a package imports its own __init__ first: an edge from a module to its package's __init__ is no cycle
    for importer, targets in edges.items():
        targets.difference_update({p for p in targets if importer.startswith(p + ".")})
    assert _cycles(edges) == []


def test_the_facade_holds_no_function_level_import() -> None:
    inside = sorted(line for target, line, in_function in GRAPH.edges["meshlib.mesh"] if in_function)
    assert inside == [], f"meshlib/mesh.py imports inside functions at lines {inside}"


def test_no_shell_imports_the_facade() -> None:
    offenders = sorted(
        f"{importer}:{line}"
        for importer, targets in GRAPH.edges.items()
        for target, line, _ in targets
        if target == "meshlib.mesh"
        and (
            (importer.split(".")[1:2] and importer.split(".")[1] in SHELL_PACKAGES)
            or importer in {f"meshlib.{m}" for m in SHELL_MODULES}
        )
    )
    assert offenders == [], "shells run on meshlib.runtime; only the façade layer builds on meshlib.mesh"


def test_no_underscore_name_is_imported_across_modules() -> None:
    assert GRAPH.underscored == [], "a name another module imports is that module's API: drop its underscore"


def test_one_class_name_is_one_class() -> None:
    defined: dict[str, list[str]] = defaultdict(list)
    for module, path in GRAPH.modules.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                defined[node.name].append(module)
    twice = {name: modules for name, modules in defined.items() if len(modules) > 1}
    assert twice == {}


def test_module_stems_say_sync_or_async_one_way() -> None:
    """The async twin of ``x.py`` is ``async_x.py`` (``aio_x.py`` in ``grpc/``, as grpc names it), never
    ``x_sync.py`` / ``sync_x.py``."""
    stems = [path.stem for path in GRAPH.modules.values()]
    assert [s for s in stems if s.startswith("sync_") or s.endswith("_sync")] == []


@pytest.mark.e2e  # a fresh interpreter per module
@pytest.mark.parametrize("module", ["meshlib.policy", "meshlib.policy.flow", "meshlib.rules.model", "meshlib.errors"])
def test_the_pure_core_loads_no_client_library(module: str) -> None:
    probe = (
        f"import sys, {module}\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'httpx', 'httpcore', 'grpc', 'opentelemetry',"
        " 'anyio', 'starlette', 'uvicorn'})))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []


@pytest.mark.e2e  # a fresh interpreter
def test_a_client_with_no_rules_file_loads_none_of_what_only_rules_and_errors_need() -> None:
    """RE2, PyYAML, difflib and importlib.metadata load at their first use: about 7 MB of RSS (measured with
    ``bench/overhead.py --only memory``) that a client with no regex rule, no rules file, no typo to explain and
    no exporter asked for never pays."""
    probe = (
        "import sys, meshlib\n"
        "m = meshlib.Mesh(service='probe', discovery='static:svc=127.0.0.1:9', control_plane='')\n"
        "m.client().close(); m.async_client()\n"
        "print(' '.join(sorted(set(sys.modules) & {'re2', 'yaml', 'difflib', 'importlib.metadata'})))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []


def test_a_rules_typo_is_a_value_error_not_a_transport_error() -> None:
    import httpx

    from meshlib.errors import ConfigurationError, MeshError
    from meshlib.rules.model import RulesValidationError

    assert not issubclass(MeshError, httpx.TransportError)
    assert issubclass(ConfigurationError, ValueError)
    assert not issubclass(RulesValidationError, httpx.TransportError)


#: private attributes that have a public view; tests use the view (``pool_for``, ``stacks()``, ``retiring()``...)
HAVE_PUBLIC_VIEWS = ("._stacks", "._mesh_transport", "._pools", "._retiring", "._pending", "._services")


def test_tests_read_public_views_not_private_attributes() -> None:
    tests = Path(__file__).resolve().parent
    found = [
        f"{path.name}:{number}"
        for path in sorted(tests.rglob("*.py"))
        if path.name != Path(__file__).name
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if any(name in line and "self" + name not in line for name in HAVE_PUBLIC_VIEWS)
    ]
    assert found == []


#: what starts a process in a test: the harness's servers, meshctl, a subprocess, the conftest fixtures that do
STARTS_PROCESSES = re.compile(
    r"\b(Upstream|ControlPlaneProcess|GrpcUpstream|served_instance|startup_lines)\(|\bsubprocess\.|"
    r"def test_\w+\([^)]*\b(upstreams|control_plane)\b"
)


def test_tests_that_start_processes_are_marked_e2e() -> None:
    tests = Path(__file__).resolve().parent
    unmarked = [
        str(path.relative_to(tests))
        for path in sorted(tests.rglob("test_*.py"))
        if "e2e" not in path.relative_to(tests).parts
        and path.name != Path(__file__).name
        and STARTS_PROCESSES.search(path.read_text())
        and "pytestmark = pytest.mark.e2e" not in path.read_text()
    ]
    assert unmarked == [], "these start processes: add pytestmark = pytest.mark.e2e (or move them to tests/e2e/)"
