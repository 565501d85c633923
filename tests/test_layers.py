"""The package's shape: imports run from higher layers to lower ones only, no module imports
itself back through others, protobuf and grpc stay in the transport (and in ``workers``, the
transport processes), and no file grows past what one reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "server" / "sluice"

#: Lowest first. A module belongs to the last entry its name starts with.
LAYERS: list[tuple[str, ...]] = [
    (
        "sluice.errors",
        "sluice.clock",
        "sluice.settings",
        "sluice.files",
        "sluice.machine",
        "sluice.threads",
        "sluice.eventloop",
        "sluice.stats",
        "sluice.domain",
        "sluice.priority",
        "sluice.tensors",
        "sluice.remote_metrics",
        "sluice.lane_metrics",
        "sluice.guardrail_metrics",
        "sluice.metrics",
        "sluice.tracing",
        "sluice.lifecycle",
        "sluice.lifecycle_redis",
        "sluice.breaker_state",
        "sluice.breaker",
        "sluice.admission",
        "sluice.callctx",
        "sluice.logs",
        "sluice.deadlines",
        "sluice.answer_config",
    ),
    ("sluice.generation",),
    ("sluice.executors",),
    ("sluice.repository",),
    ("sluice.batching",),
    ("sluice.loader",),
    ("sluice.caching",),
    ("sluice.registry",),
    ("sluice.dataplane",),
    ("sluice.shadow",),
    ("sluice.routing",),
    ("sluice.policy", "sluice.prober"),
    ("sluice.core",),
    ("sluice.transport",),
    ("sluice.workers",),
    ("sluice.app", "sluice.cli", "sluice.__main__"),
]

MAX_FILE_LINES = 400
#: Files allowed past it, and why.
LONG_FILES = {
    "sluice.settings": "the one settings tree: a declaration and a docstring per setting",
}
TRANSPORT_ONLY = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf", "sluice_api")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """Every module a module imports (at import time or for type checking)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def internal_imports(name: str) -> set[str]:
    return {target for target in imports(name) if target in MODULES and target != name}


def layer(name: str) -> int:
    found = -1
    for index, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(f"{p}.") for p in prefixes):
            found = index
    return found


def test_every_module_has_a_layer() -> None:
    unplaced = [name for name in MODULES if name != "sluice" and layer(name) < 0]
    assert not unplaced, f"in no layer of tests/test_layers.py: {', '.join(unplaced)}"


def test_imports_run_downwards() -> None:
    upward = [
        f"{name} -> {target}"
        for name in MODULES
        for target in sorted(internal_imports(name))
        if target != "sluice" and layer(target) > layer(name)
    ]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    graph = {name: internal_imports(name) for name in MODULES}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = [*path[path.index(name) :], name]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_protobuf_and_grpc_stay_in_the_transport() -> None:
    leaked = [
        f"{name} -> {target}"
        for name in MODULES
        if not name.startswith(("sluice.transport", "sluice.workers"))
        for target in sorted(imports(name))
        if any(target == t or target.startswith(f"{t}.") for t in TRANSPORT_ONLY)
    ]
    assert not leaked, "transport-only imports elsewhere:\n" + "\n".join(leaked)


def test_no_file_outgrows_one_reading() -> None:
    sizes = {name: path.read_text().count("\n") for name, path in MODULES.items()}
    long = [
        f"{name}: {lines} lines"
        for name, lines in sizes.items()
        if lines > MAX_FILE_LINES and name not in LONG_FILES
    ]
    assert not long, "\n".join(long)
