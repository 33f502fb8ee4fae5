"""Pipeline graphs written in Python, in SAGE's shape, building the same IR `Graph` a YAML file does.

    env = Environment("colocated", model="smollm2-135m-instruct")
    env.from_source("prompt_source").map("admission").map(PolicySort, policy="fifo").map("engine").sink("stdout_sink")
    result = env.execute()

A linear stream is a chain of `DataStream` calls; a graph that branches (PD disaggregation, several engines) is
built with `Pipeline`, whose `add` returns node ids that `connect`/`chain` join:

    p = Pipeline("pd", model="smollm2-135m-instruct")
    route, prefill, decode = p.add("route"), p.add("prefill", placement="process:prefill"), p.add("decode")
    p.connect(route, prefill, decode)

Operators are given as a registered class (its `name` is used) or a registry name. `graph()` validates like the
YAML loader, and an error points at the line of the call that made the node or edge, as a YAML error points at the
line of the file."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from sagellm.runtime.execution_graph.graph import Graph, Node
from sagellm.runtime.pipeline.operator import Operator, OperatorError, get_operator
from sagellm.runtime.pipeline.spec import FILE_KEY, LOCATIONS_KEY, PipelineError, add_edge, validate

if TYPE_CHECKING:
    from sagellm.runtime.executor.local import PipelineResult

OpRef = type[Operator] | str


class Pipeline:
    """A graph built node by node: `add` returns the node id, `connect` and `chain` draw edges."""

    def __init__(self, name: str, **attrs: Any) -> None:
        self._graph = Graph(attrs={"name": name, **attrs})
        self._file, line = _caller()
        self._locations: dict[str, int] = dict.fromkeys(self._graph.attrs, line)  # settings: the constructor's line

    def add(self, op: OpRef, id: str | None = None, placement: str = "task", **params: Any) -> str:
        """Adds a node running `op` with `params`; its id defaults to the op name, suffixed `_2`, `_3` if taken."""
        name = self._op_name(op)
        node_id = id if id is not None else self._fresh_id(name)
        if node_id in self._graph.nodes:
            raise self._error(f"nodes.{node_id}", f"node id {node_id!r} is already used")
        self._graph.nodes[node_id] = Node(node_id, name, dict(params), placement)
        self._mark(f"nodes.{node_id}")
        return node_id

    def connect(self, src: str, *dsts: str) -> None:
        """Edges from `src` to each of `dsts` (several: fan-out, which needs a multi_output operator at `src`)."""
        for dst in dsts:
            self._mark(f"edges.{len(self._graph.edges)}")
            add_edge(self._graph, src, dst)

    def chain(self, *ids: str) -> None:
        """Edges `ids[0] -> ids[1] -> ...`."""
        for src, dst in zip(ids, ids[1:]):
            self.connect(src, dst)

    def graph(self) -> Graph:
        """A validated copy of the graph built so far; raises `PipelineError` naming the line of the bad call."""
        graph = self._graph.copy()
        graph.attrs[FILE_KEY] = self._file
        graph.attrs[LOCATIONS_KEY] = dict(self._locations)
        return validate(graph)

    def _op_name(self, op: OpRef) -> str:
        if isinstance(op, str):
            return op  # checked against the registry by graph(), with the line of this call
        name = getattr(op, "name", "")
        try:
            registered = get_operator(name)
        except OperatorError:
            registered = None
        if registered is not op:
            raise self._error(None, f"{op!r} is not a registered operator; decorate it with @register_operator")
        return name

    def _fresh_id(self, name: str) -> str:
        node_id, n = name, 1
        while node_id in self._graph.nodes:
            n += 1
            node_id = f"{name}_{n}"
        return node_id

    def _mark(self, field: str) -> None:
        """Remembers the caller's line for `field` (only for calls from the file the pipeline was created in)."""
        file, line = _caller()
        if file == self._file:
            self._locations[field] = line

    def _error(self, field: str | None, problem: str) -> PipelineError:
        file, line = _caller()
        return PipelineError(problem, file=file, line=line, field=field)


class Environment:
    """SAGE's entry point: `from_source` starts a stream; `graph()` validates it, `execute()` runs it locally."""

    def __init__(self, name: str, **attrs: Any) -> None:
        self.pipeline = Pipeline(name, **attrs)

    def from_source(
        self, source: OpRef, *, id: str | None = None, placement: str = "task", **params: Any
    ) -> DataStream:
        return DataStream(self.pipeline, self.pipeline.add(source, id, placement, **params))

    def graph(self) -> Graph:
        return self.pipeline.graph()

    def execute(self) -> PipelineResult:
        """Runs the graph to completion with the local executor (trio tasks, and processes where placed)."""
        from sagellm.runtime.executor.run import run_pipeline

        return run_pipeline(self.graph())


class DataStream:
    """The output of one node: `map` and `sink` add a node fed by it and return that node's stream."""

    def __init__(self, pipeline: Pipeline, node_id: str) -> None:
        self.pipeline, self.node_id = pipeline, node_id

    def map(self, op: OpRef, *, id: str | None = None, placement: str = "task", **params: Any) -> DataStream:
        node_id = self.pipeline.add(op, id, placement, **params)
        self.pipeline.connect(self.node_id, node_id)
        return DataStream(self.pipeline, node_id)

    def sink(self, op: OpRef, *, id: str | None = None, placement: str = "task", **params: Any) -> DataStream:
        """A sink is a node like any other (metrics_sink passes items on to stdout_sink), so the stream goes on."""
        return self.map(op, id=id, placement=placement, **params)


def _caller() -> tuple[str, int]:
    """File and line of the first frame outside this module: the user's DSL call."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return frame.f_code.co_filename, frame.f_lineno
