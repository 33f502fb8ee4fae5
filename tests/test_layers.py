"""The house's floors hold: no import runs from a lower floor to a higher one, folders import each other one way
only, and no function-level import hides a cycle (docs/architecture.md, "Floors").

Every import counts, wherever it is written: at module level, inside a function (a lazy import), or under
`TYPE_CHECKING`. A lazy import is fine for start-up time, never as the thing that keeps two modules apart: with every
import counted the module graph must still have no cycle."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Code folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGES = {
    "common": "sagellm.common",
    "backends": "sagellm.backends",
    "runtime": "sagellm.runtime",
    "operators": "sagellm.operators",
    "sagellm": "sagellm",
    "benchmarks": "sagellm.benchmarks",
    "graphs": "sagellm.graphs",
}
# Bottom to top. A module's floor is that of the longest prefix listed; each floor may import only floors below it
# (and itself). Inside the runtime, the engine knows nothing of pipelines, and pipelines nothing of executors.
FLOORS = [
    ["sagellm.common", "sagellm.graphs"],
    ["sagellm.backends"],
    ["sagellm.runtime.execution_graph"],
    ["sagellm.runtime.models"],
    ["sagellm.runtime.multimodal"],  # images into what the engine runs: preprocessing, features, the encoder
    ["sagellm.runtime.engine", "sagellm.runtime.embedding"],
    ["sagellm.runtime.pipeline"],
    ["sagellm.runtime.comm"],
    ["sagellm.runtime.executor", "sagellm.runtime.parallel", "sagellm.runtime"],
    ["sagellm.operators"],
    # The gateway's rooms, bottom to top (sagellm/gateway/__init__.py): settings every room reads; HTTP without LLMs;
    # the serving core; the APIs; the control plane; API server processes; the gateway process that joins them.
    ["sagellm.gateway.config", "sagellm.gateway.state"],
    ["sagellm.gateway.http"],
    ["sagellm.gateway.keys"],  # API keys with their policies: the front ends' ring, the core's limits
    ["sagellm.gateway.media"],  # a request's images and audio fetched and decoded under the operator's policy
    ["sagellm.gateway.serving"],
    ["sagellm.gateway.indexes"],
    # What every API shares about a reply, below all of them: tool and reasoning parsers, Harmony, the reply reader
    ["sagellm.gateway.replies"],
    ["sagellm.gateway.openai"],
    ["sagellm.gateway.anthropic"],  # the Messages API, run as the OpenAI chat it is
    ["sagellm.gateway.sessions"],
    ["sagellm.gateway.control"],
    ["sagellm.gateway.api_servers"],
    ["sagellm.gateway.server", "sagellm.gateway"],
    ["sagellm"],  # the library's top floor: client, LLM, DSL, SAGE adapter, presets, above the gateway
    ["sagellm.benchmarks"],
    ["sagellm.cli"],
]


class Module:
    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path = name, path
        self.folder = str(path.parent.relative_to(ROOT))
        self.imports: list[tuple[int, str]] = []  # (line, imported module)


def _modules() -> dict[str, Module]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            modules[name] = Module(name, path)
    for module in modules.values():
        is_package = module.path.name == "__init__.py"
        for node in ast.walk(ast.parse(module.path.read_text(), str(module.path))):
            for target in _targets(node, module.name, is_package, modules):
                module.imports.append((node.lineno, target))
    return modules


def _targets(node: ast.AST, importer: str, is_package: bool, modules: dict[str, Module]) -> list[str]:
    """The project modules an import statement loads (`from pkg import submodule` loads the submodule)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = importer.split(".")[: len(importer.split(".")) - node.level + (1 if is_package else 0)]
            base = ".".join(parts + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    else:
        return []
    return sorted({_known(name, modules) for name in names if name.split(".")[0] == "sagellm"} - {None})


def _known(name: str, modules: dict[str, Module]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _floor(module: str) -> int:
    best, floor = -1, -1
    for index, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), index
    return floor


MODULES = _modules()


def test_every_module_has_a_floor() -> None:
    assert MODULES, "no modules found: is the test run from a checkout?"
    assert [m for m in MODULES if _floor(m) < 0] == []


def test_no_import_runs_up_a_floor() -> None:
    upward = [
        f"{m.path.relative_to(ROOT)}:{line}: {m.name} (floor {_floor(m.name)}) imports {t} (floor {_floor(t)})"
        for m in MODULES.values()
        for line, t in m.imports
        if _floor(t) > _floor(m.name)
    ]
    assert upward == []


def test_folders_import_each_other_one_way() -> None:
    """Between folders that do not contain each other: a subfolder is a room inside its parent's (`backends/native/`
    is part of the CPU backend), so imports between the two are the room's own business."""
    edges: dict[str, set[str]] = defaultdict(set)
    for m in MODULES.values():
        for _, t in m.imports:
            a, b = m.folder, MODULES[t].folder
            if not (a == b or a.startswith(b + "/") or b.startswith(a + "/")):
                edges[a].add(b)
    assert _cycle(edges) == []


def test_no_module_cycle_even_counting_lazy_imports() -> None:
    edges = {m.name: {t for _, t in m.imports if t != m.name} for m in MODULES.values()}
    assert _cycle(edges) == []


def _cycle(edges: dict[str, set[str]]) -> list[str]:
    """One cycle of the directed graph, as a path that returns to its start, or [] if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return []


@pytest.mark.parametrize("edges, expected", [({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]), ({"a": {"b"}}, [])])
def test_cycle_finder(edges: dict[str, set[str]], expected: list[str]) -> None:
    assert _cycle(edges) == expected
