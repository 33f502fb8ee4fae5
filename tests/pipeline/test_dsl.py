"""The Python DSL builds the same IR as the equivalent YAML, and its errors point at the line of the DSL call."""

from __future__ import annotations

import sys

import pytest

from sagellm.dsl import Environment, Pipeline
from sagellm.runtime.pipeline.operator import MapOperator, SourceOperator, register_operator
from sagellm.runtime.pipeline.spec import PipelineError, same_graph
from sagellm.runtime.pipeline.yaml_io import dump_pipeline, load_pipeline


@register_operator
class _Source(SourceOperator):
    name = "test_dsl_source"

    def __init__(self, count: int = 1) -> None:
        self.count = count


@register_operator
class _Map(MapOperator):
    name = "test_dsl_map"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale


@register_operator
class _Route(MapOperator):
    name = "test_dsl_route"
    multi_output = True

    def __init__(self, strategy: str = "load_balanced") -> None:
        self.strategy = strategy


def _next_line() -> int:
    """The line after the caller's: where the DSL call under test is written."""
    return sys._getframe(1).f_lineno + 1


def test_linear_stream_matches_yaml() -> None:
    env = Environment("lin", model="tiny", transport="ipc")
    stream = env.from_source(_Source, count=2).map("test_dsl_map", scale=2.0)
    stream.map(_Map, id="last", placement="process:x").sink("test_dsl_map")
    expected = load_pipeline(
        """\
name: lin
model: tiny
transport: ipc
nodes:
  test_dsl_source: {op: test_dsl_source, params: {count: 2}}
  test_dsl_map: {op: test_dsl_map, params: {scale: 2.0}}
  last: {op: test_dsl_map, placement: "process:x"}
  test_dsl_map_2: {op: test_dsl_map}
edges:
  - test_dsl_source -> test_dsl_map -> last -> test_dsl_map_2
"""
    )
    graph = env.graph()
    assert same_graph(graph, expected)
    assert same_graph(load_pipeline(dump_pipeline(graph)), expected)


def test_branching_pipeline_matches_yaml() -> None:
    p = Pipeline("pd", model="tiny")
    src = p.add("test_dsl_source")
    route = p.add(_Route, id="route", strategy="round_robin")
    a, b = p.add(_Map, id="a"), p.add("test_dsl_map", id="b", placement="process:b")
    out = p.add("test_dsl_map", id="out")
    p.chain(src, route)
    p.connect(route, a, b)
    p.chain(a, out)
    p.chain(b, out)
    expected = load_pipeline(
        """\
name: pd
model: tiny
nodes:
  test_dsl_source: {op: test_dsl_source}
  route: {op: test_dsl_route, params: {strategy: round_robin}}
  a: {op: test_dsl_map}
  b: {op: test_dsl_map, placement: "process:b"}
  out: {op: test_dsl_map}
edges:
  - test_dsl_source -> route -> [a, b]
  - a -> out
  - b -> out
"""
    )
    graph = p.graph()
    assert same_graph(graph, expected)
    assert [e.port for e in graph.edges if e.dst == "out"] == [0, 1]


def test_default_ids_are_unique() -> None:
    p = Pipeline("ids")
    assert [p.add("test_dsl_map") for _ in range(3)] == ["test_dsl_map", "test_dsl_map_2", "test_dsl_map_3"]


def test_parameter_error_points_at_the_map_call() -> None:
    env = Environment("bad")
    line = _next_line()
    env.from_source("test_dsl_source").map("test_dsl_map", speed=1)
    with pytest.raises(PipelineError) as info:
        env.graph()
    err = info.value
    assert (err.file, err.line, err.field) == (__file__, line, "nodes.test_dsl_map.params.speed")
    assert "unknown parameter 'speed'" in str(err)


def test_unknown_operator_and_bad_placement_point_at_the_add_call() -> None:
    p = Pipeline("bad")
    src = p.add("test_dsl_source")
    line = _next_line()
    p.chain(src, p.add("test_dsl_nope"))
    with pytest.raises(PipelineError, match="unknown operator 'test_dsl_nope'") as info:
        p.graph()
    assert (info.value.line, info.value.field) == (line, "nodes.test_dsl_nope.op")

    p = Pipeline("bad")
    line = _next_line()
    p.chain(p.add("test_dsl_source"), p.add("test_dsl_map", placement="thread"))
    with pytest.raises(PipelineError, match="placement 'thread'") as info:
        p.graph()
    assert info.value.line == line


def test_edge_errors_point_at_the_connect_call() -> None:
    p = Pipeline("bad")
    src, m = p.add("test_dsl_source"), p.add("test_dsl_map")
    p.connect(src, m)
    line = _next_line()
    p.connect(m, "missing")
    with pytest.raises(PipelineError, match="no node 'missing'") as info:
        p.graph()
    assert (info.value.file, info.value.line, info.value.field) == (__file__, line, "edges")


def test_fan_out_from_a_plain_stream_is_rejected() -> None:
    env = Environment("fan")
    line = _next_line()
    stream = env.from_source("test_dsl_source").map("test_dsl_map", id="m")
    stream.map("test_dsl_map", id="x")
    stream.map("test_dsl_map", id="y")
    with pytest.raises(PipelineError, match="node 'm' feeds x, y") as info:
        env.graph()
    assert info.value.line == line


def test_unregistered_class_and_duplicate_id_fail_at_the_call() -> None:
    class Unregistered(MapOperator):
        name = "test_dsl_unregistered"

    p = Pipeline("bad")
    line = _next_line()
    with pytest.raises(PipelineError, match="not a registered operator") as info:
        p.add(Unregistered)
    assert (info.value.file, info.value.line) == (__file__, line + 1)
    p.add("test_dsl_map", id="m")
    with pytest.raises(PipelineError, match="node id 'm' is already used"):
        p.add("test_dsl_map", id="m")


def test_graph_settings_are_validated() -> None:
    line = _next_line()
    env = Environment("x", transport="udp")
    env.from_source("test_dsl_source").map("test_dsl_map")
    with pytest.raises(PipelineError, match="transport: expected one of 'ipc', 'tcp'") as info:
        env.graph()
    assert info.value.line == line
    env = Environment("x", workers=2)
    env.from_source("test_dsl_source").map("test_dsl_map")
    with pytest.raises(PipelineError, match="workers: unknown graph setting"):
        env.graph()
