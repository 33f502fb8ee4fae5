"""Pipeline YAML: the shipped graph files round-trip, and every mistake is reported with its file, line and field.

The shipped graphs name operators other modules register (engine, prefill, ...), so they are parsed without the
registry check; full validation runs on graphs of small operators registered here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import pytest

from sagellm.common.hints import conforms, describe
from sagellm.runtime.execution_graph.graph import Edge, Graph, Node
from sagellm.runtime.pipeline.operator import MapOperator, SourceOperator, list_operators, register_operator
from sagellm.runtime.pipeline.spec import PipelineError, same_graph
from sagellm.runtime.pipeline.yaml_io import dump_pipeline, load_pipeline

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"


@register_operator
class _Source(SourceOperator):
    name = "test_yaml_source"

    def __init__(self, count: int = 1) -> None:
        self.count = count


@register_operator
class _Map(MapOperator):
    name = "test_yaml_map"

    def __init__(
        self,
        scale: float = 1.0,
        label: str | None = None,
        tags: list[str] | None = None,
        weights: dict[str, float] | None = None,
        mode: Literal["fast", "slow"] = "fast",
    ) -> None:
        self.scale = scale


@register_operator
class _Needs(MapOperator):
    name = "test_yaml_needs"

    def __init__(self, path: str) -> None:
        self.path = path


@register_operator
class _Fan(MapOperator):
    name = "test_yaml_fan"
    multi_output = True


VALID = """\
name: t
description: test graph
model: tiny
transport: ipc
nodes:
  src: {op: test_yaml_source, params: {count: 3}}
  a: {op: test_yaml_map, params: {scale: 2, mode: slow}}
  fan: {op: test_yaml_fan}
  b: {op: test_yaml_map, placement: "process:b"}
  c:
    op: test_yaml_map
    placement: process
    params:
      tags: [x, y]
      weights: {p: 1, q: 0.5}
  out: {op: test_yaml_map}
edges:
  - src -> a -> fan -> [b, c]
  - b -> out
  - c -> out
"""


def test_valid_graph_builds_the_ir() -> None:
    graph = load_pipeline(VALID)
    assert list(graph.nodes) == ["src", "a", "fan", "b", "c", "out"]
    assert graph.nodes["a"] == Node("a", "test_yaml_map", {"scale": 2, "mode": "slow"})
    assert graph.nodes["b"].placement == "process:b"
    assert graph.nodes["c"].params == {"tags": ["x", "y"], "weights": {"p": 1, "q": 0.5}}
    assert graph.edges == [
        Edge("src", "a"),
        Edge("a", "fan"),
        Edge("fan", "b"),
        Edge("fan", "c"),
        Edge("b", "out", port=0),
        Edge("c", "out", port=1),
    ]
    assert {k: v for k, v in graph.attrs.items() if not k.startswith("_")} == {
        "name": "t",
        "description": "test graph",
        "model": "tiny",
        "transport": "ipc",
    }


@pytest.mark.parametrize("name", ["colocated", "pd", "multi_instance"])
def test_shipped_graphs_round_trip(name: str) -> None:
    graph = load_pipeline(GRAPHS / f"{name}.yaml", validate=False)
    assert graph.attrs["name"] == name and graph.attrs["model"] == "smollm2-135m-instruct"
    assert graph.attrs["transport"] == "ipc"
    text = dump_pipeline(graph)
    again = load_pipeline(text, validate=False)
    assert same_graph(graph, again)
    assert dump_pipeline(again) == text


def test_pd_graph_shape() -> None:
    graph = load_pipeline(GRAPHS / "pd.yaml", validate=False)
    pairs = {(e.src, e.dst) for e in graph.edges}
    assert {("route", "prefill"), ("route", "decode"), ("prefill", "kv_transfer"), ("kv_transfer", "decode")} <= pairs
    assert graph.nodes["pd_split"].params == {"threshold_tokens": 1}
    placements = {n: graph.nodes[n].placement for n in ("prefill", "kv_transfer", "decode", "route")}
    assert placements == {
        "prefill": "process:prefill",
        "kv_transfer": "process:decode",
        "decode": "process:decode",
        "route": "task",
    }
    multi = load_pipeline(GRAPHS / "multi_instance.yaml", validate=False)
    assert multi.nodes["route"].params == {"strategy": "load_balanced"}
    assert [multi.nodes[n].op for n in ("engine_a", "engine_b")] == ["engine", "engine"]


@pytest.mark.parametrize("name", ["colocated", "pd", "multi_instance"])
def test_shipped_graphs_validate(name: str) -> None:
    """Every operator they name is found (through the `sagellm.operators` entry points) and takes its parameters."""
    graph = load_pipeline(GRAPHS / f"{name}.yaml", validate=False)
    missing = {node.op for node in graph.nodes.values()} - set(list_operators())
    assert not missing, f"shipped graph {name}.yaml names operators that are not registered: {sorted(missing)}"
    load_pipeline(GRAPHS / f"{name}.yaml")


def test_round_trip_keeps_edge_order_ports_and_odd_values() -> None:
    graph = Graph(attrs={"name": "odd", "description": "two\nlines: yes"})
    graph.nodes = {
        "x": Node("x", "test_yaml_source"),
        "y": Node("y", "test_yaml_source"),
        "on": Node("on", "test_yaml_fan"),
        "b": Node("b", "test_yaml_map", {"label": "a: b -> [c]", "tags": []}),
        "c": Node("c", "test_yaml_map", {"label": None, "scale": 0.5}, "process:g-1"),
    }
    graph.edges = [Edge("x", "on"), Edge("y", "on", 1), Edge("on", "b"), Edge("on", "c"), Edge("b", "c", 1)]
    again = load_pipeline(dump_pipeline(graph))
    assert same_graph(graph, again)


# Each case: replacements applied to VALID, the expected field, a text on the expected line, a part of the problem.
ERRORS: dict[str, tuple[dict[str, str], str, str, str]] = {
    "unknown operator": (
        {"b: {op: test_yaml_map": "b: {op: test_yaml_nope"},
        "nodes.b.op",
        "test_yaml_nope",
        "unknown operator 'test_yaml_nope'; known operators: ",
    ),
    "missing edge endpoint": ({"- b -> out": "- b -> outt"}, "edges", "b -> outt", "no node 'outt'"),
    "cycle": ({"- c -> out": "- c -> out -> a"}, "edges", "c -> out -> a", "cycle a -> fan -> b -> out -> a"),
    "bad parameter type": ({"scale: 2,": "scale: fast,"}, "nodes.a.params.scale", "scale: fast", "expected float"),
    "bool is not an int": ({"count: 3": "count: true"}, "nodes.src.params.count", "count: true", "expected int"),
    "literal": ({"mode: slow": "mode: medium"}, "nodes.a.params.mode", "medium", "one of 'fast', 'slow'"),
    "list item type": ({"tags: [x, y]": "tags: [x, 1]"}, "nodes.c.params.tags", "tags:", "list[str] | None"),
    "dict value type": ({"q: 0.5": "q: high"}, "nodes.c.params.weights", "weights:", "dict[str, float]"),
    "unknown parameter": (
        {"mode: slow}": "mode: slow, speed: 3}"},
        "nodes.a.params.speed",
        "speed: 3",
        "unknown parameter 'speed'; test_yaml_map takes scale, label",
    ),
    "missing parameter": (
        {"  out: {op": "  needs: {op: test_yaml_needs}\n  out: {op", "- c -> out": "- c -> out -> needs"},
        "nodes.needs.params",
        "needs: {op",
        "test_yaml_needs needs parameter 'path' (str)",
    ),
    "bad placement": (
        {"placement: process\n": "placement: proc\n"},
        "nodes.c.placement",
        "placement: proc",
        "'process:GROUP'",
    ),
    "duplicate node": (
        {"  out: {op": "  a: {op: test_yaml_map}\n  out: {op"},
        "nodes.a",
        "a: {op: test_yaml_map}",
        "duplicate key",
    ),
    "duplicate param": ({"mode: slow}": "mode: slow, scale: 3}"}, "nodes.a.params.scale", "scale: 3", "duplicate"),
    "unconnected node": (
        {"  out: {op": "  lonely: {op: test_yaml_map}\n  out: {op"},
        "nodes.lonely",
        "lonely",
        "not connected",
    ),
    "multi-output": ({"- b -> out": "- b -> [out, c]"}, "nodes.b", "b: {op", "node 'b' feeds out, c; put a multi"),
    "source with input": (
        {"[b, c]": "[b, c, src2]", "  out: {op": "  src2: {op: test_yaml_source}\n  out: {op"},
        "edges",
        "[b, c, src2]",
        "source node 'src2' takes no input",
    ),
    "no source": ({"op: test_yaml_source, params: {count: 3}": "op: test_yaml_map"}, "nodes", "nodes:", "no source"),
    "unknown top-level key": ({"transport: ipc": "transport: ipc\nworkers: 2"}, "workers", "workers", "unknown top"),
    "unknown node key": ({"{op: test_yaml_fan}": "{op: test_yaml_fan, n: 2}"}, "nodes.fan.n", "n: 2", "use op,"),
    "bad transport": ({"transport: ipc": "transport: udp"}, "transport", "udp", "one of 'ipc', 'tcp'"),
    "bad chain": ({"- b -> out": "- b -> -> out"}, "edges", "b -> -> out", "got 'b -> -> out'"),
    "edge not a string": ({"- b -> out": "- [b, out]"}, "edges", "- [b, out]", "an edge is a string"),
    "bad node id": ({"  out: {op": "  no.dots: {op: test_yaml_map}\n  out: {op"}, "nodes.no.dots", "no.dots", "id"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_name_file_line_and_field(case: str, tmp_path: Path) -> None:
    assert_error_at(VALID, ERRORS[case], tmp_path)


def assert_error_at(valid: str, case: tuple[dict[str, str], str, str, str], tmp_path: Path) -> None:
    """`valid` with the case's replacements, written to a file, fails to load naming the file, the line holding the
    case's text, the field and the problem (test_remote_settings checks its own cases with it)."""
    replacements, field, on_line, problem = case
    text = valid
    for old, new in replacements.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / "g.yaml"
    path.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if on_line in row)
    with pytest.raises(PipelineError) as info:
        load_pipeline(path)
    err = info.value
    assert (err.file, err.line, err.field) == (str(path), line, field)
    assert str(err).startswith(f"{path}:{line}: {field}: ")
    assert problem in err.problem


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(VALID.replace("  out: {op: test_yaml_map}", "  out: {op: test_yaml_map"))
    with pytest.raises(PipelineError, match=r"broken\.yaml:\d+: invalid YAML"):
        load_pipeline(path)
    with pytest.raises(PipelineError, match="cannot read the pipeline file"):
        load_pipeline(tmp_path / "absent.yaml")


def test_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(VALID.replace("name: t\n", ""))
    assert load_pipeline(path).attrs["name"] == "mine"


def test_overrides_are_parsed_as_yaml_and_validated() -> None:
    graph = load_pipeline(VALID, overrides={"a.scale": "3.5", "b.label": "x", "c.tags": "[z]", "model": "other"})
    assert graph.nodes["a"].params["scale"] == 3.5
    assert graph.nodes["b"].params == {"label": "x"}
    assert graph.nodes["c"].params["tags"] == ["z"]
    assert graph.attrs["model"] == "other"
    assert load_pipeline(VALID, overrides={"src.count": 7}).nodes["src"].params["count"] == 7


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"a.scale": "fast"}, "--set a.scale: expected float, got str 'fast'"),
        ({"a.speed": "1"}, "--set a.speed: unknown parameter 'speed'"),
        ({"zz.scale": "1"}, "--set zz.scale: no node 'zz'"),
        ({"workers": "2"}, "--set workers: unknown graph setting"),
        ({"transport": "udp"}, "--set transport: expected one of 'ipc', 'tcp'"),
    ],
)
def test_bad_overrides_name_the_override(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(PipelineError) as info:
        load_pipeline(VALID, overrides=overrides)
    assert str(info.value).startswith(message)
    assert info.value.file is None and info.value.line is None


@pytest.mark.parametrize(
    ("value", "hint", "ok"),
    [
        (1, int, True),
        (True, int, False),
        (1, float, True),
        (False, float, False),
        (True, bool, True),
        (1, bool, False),
        (None, int | None, True),
        ("x", int | None, False),
        (["a"], list[str], True),
        ([1], list[str], False),
        ({"a": 1.5}, dict[str, float], True),
        ({1: 1.5}, dict[str, float], False),
        ("fifo", Literal["fifo", "priority"], True),
        ("lifo", Literal["fifo", "priority"], False),
        (1, Literal[True], False),
        (object(), Any, True),
        (sys.exit, type(sys.exit), True),
    ],
)
def test_conforms(value: Any, hint: Any, ok: bool) -> None:
    assert conforms(value, hint) is ok


def test_describe() -> None:
    assert describe(dict[str, float] | None) == "dict[str, float] | None"
    assert describe(Literal["a", "b"]) == "one of 'a', 'b'"


REAL = """\
model: some-model
autoscale: {max_instances: 3, down_load: 0.2}
nodes:
  src: {op: prompt_source}
  admission: {op: admission, params: {max_queue: 64}}
  sort: {op: policy_sort, params: {policy: fifo}}
  route: {op: route, params: {strategy: load_balanced}}
  engine: {op: engine, params: {max_num_seqs: 4, kv_cache_memory_gb: 0.5}}
  out: {op: stdout_sink}
edges:
  - src -> admission -> sort -> route -> engine -> out
"""
# Values of the right type but out of range: the operator's own checks (and the engine's settings) say so at load.
RANGE_ERRORS: dict[str, tuple[dict[str, str], str, str, str]] = {
    "queue bound": ({"max_queue: 64": "max_queue: 0"}, "nodes.admission.params.max_queue", "max_queue", ">= 1"),
    "engine batch": (
        {"max_num_seqs: 4": "max_num_seqs: 0"},
        "nodes.engine.params.max_num_seqs",
        "max_num_seqs",
        ">= 1",
    ),
    "engine memory": (
        {"kv_cache_memory_gb: 0.5": "kv_cache_memory_gb: -1"},
        "nodes.engine.params.kv_cache_memory_gb",
        "kv_cache_memory_gb",
        "> 0",
    ),
    "autoscale bound": ({"max_instances: 3": "max_instances: 0"}, "autoscale.max_instances", "autoscale", "<="),
    "autoscale load": ({"down_load: 0.2": "down_load: 2"}, "autoscale.down_load", "autoscale", "[0, 1)"),
    "autoscale key": ({"down_load: 0.2": "down_loads: 0.2"}, "autoscale.down_loads", "autoscale", "unknown"),
    "policy name": ({"policy: fifo": "policy: lifo"}, "nodes.sort.params.policy", "lifo", "unknown scheduling policy"),
    "strategy name": (
        {"strategy: load_balanced": "strategy: fastest"},
        "nodes.route.params.strategy",
        "fastest",
        "unknown routing strategy",
    ),
}


@pytest.mark.parametrize("case", list(RANGE_ERRORS))
def test_range_errors_name_file_line_and_parameter(case: str, tmp_path: Path) -> None:
    load_pipeline(REAL)  # the graph as written is valid
    assert_error_at(REAL, RANGE_ERRORS[case], tmp_path)


BOMB = "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['x'] * 9)}]\n"
    for p, c in zip(["", *"abcdefgh"], "abcdefghi")
)


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        (BOMB + "nodes: {}\n", 1, "anchors and aliases (&, *) are not supported"),  # 9**9 items if expanded
        ("nodes:\n  src: &s {op: prompt_source}\n  again: *s\n", 2, "anchors and aliases"),
        ("name: !!python/object/apply:os.system [echo hi]\nnodes: {}\n", 1, "cannot read this value: could not"),
    ],
)
def test_yaml_that_would_hang_or_run_code_is_a_located_error(text: str, line: int, problem: str, tmp_path: Path):
    path = tmp_path / "g.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError) as raised:
        load_pipeline(path)
    assert (raised.value.file, raised.value.line) == (str(path), line) and problem in str(raised.value)
