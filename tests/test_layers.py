"""The package's layers, read from the source: which modules may import which, no cycles, and
no module over 400 lines (docs/architecture.md, "Layers").

Every ``import`` counts, at module level or inside a function, except those under
``if TYPE_CHECKING:`` (type hints, never run).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stream_lstm"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package's modules ``path`` imports (``from pkg import module`` counts as module)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("stream_lstm"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stream_lstm"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in known}


FILES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {m: imported_modules(p, set(FILES)) - {m} for m, p in FILES.items()}


def layer(module: str) -> str:
    """``kafka``, ``state``, ``tools``... for a subpackage's modules; the module's own name
    (``worker``, ``engine``...) for the top-level ones."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


# layer -> layers it must not import
FORBIDDEN = {
    "kafka": {"models", "engine", "forecast", "experts", "training", "pipeline", "worker",
              "transaction", "partitions", "housekeeping"},
    "state": {"experts", "forecast", "kafka", "worker", "training", "transaction", "partitions",
              "housekeeping"},
    "checkpointing": {"worker", "transaction", "partitions", "housekeeping", "training"},
    # the worker's parts, in order: none imports one above it
    "transaction": {"partitions", "housekeeping", "worker"},
    "partitions": {"housekeeping", "worker"},
    "housekeeping": {"transaction", "partitions", "worker"},
}


def test_the_scanner_sees_imports():
    # A test that read no imports would pass whatever the code did.
    assert "stream_lstm.transaction" in GRAPH["stream_lstm.worker"]
    assert "stream_lstm.kafka.clients" in GRAPH["stream_lstm.kafka.group_consumer"]
    assert len(FILES) > 50


@pytest.mark.parametrize("source", sorted(FORBIDDEN))
def test_no_layer_imports_what_it_must_not(source):
    broken = sorted((m, d) for m, deps in GRAPH.items() if layer(m) == source
                    for d in deps if layer(d) in FORBIDDEN[source])
    assert not broken, f"{source}/ must not import {sorted(FORBIDDEN[source])}: {broken}"


def test_only_the_cli_and_tools_import_tools():
    broken = sorted((m, d) for m, deps in GRAPH.items() for d in deps
                    if layer(d) == "tools" and layer(m) not in ("tools", "cli"))
    assert not broken, f"only cli.py and tools/ may import tools/: {broken}"


def test_no_import_cycles():
    # Tarjan's strongly connected components: a component of two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
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
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_is_over_400_lines():
    long = sorted((m, n) for m, p in FILES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES)
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


def test_only_the_cli_imports_the_relay():
    # The relay reads what the worker wrote; nothing of the worker may depend on it.
    broken = sorted(f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps
                    if layer(d) == "relay" and layer(m) not in ("relay", "cli"))
    assert not broken, f"only cli.py may import relay/: {broken}"
    assert any(layer(d) == "kafka" for d in GRAPH["stream_lstm.relay.service"])  # (the scan sees it)
