"""What makes a pipeline graph valid, checked before anything runs, with errors that point at the line to fix.

Both front ends, YAML files (`yaml_io`) and the Python DSL (`sagellm.dsl`), build the IR `Graph` and hand it here with
`locations`, a map from a field path ("nodes.route.params.strategy", "edges.3" for the fourth IR edge) to the line that
wrote it, so a mistake found only when the whole graph is known still reads `pd.yaml:14: nodes.route.params.strategy:
...`. Front ends keep the file and the locations in the private graph attrs `_file` and `_locations`, so a later
`validate(graph)` (the executor's) points at the same lines. Operators are looked up in the registry at validation
time and their parameters checked against `parameter_types`, so a typo fails at load, not deep inside a run."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Literal, NoReturn

from sagellm.common.autoscale import AutoscaleSettings
from sagellm.common.errors import FieldError, InvalidInput
from sagellm.common.hints import conforms, describe
from sagellm.common.restart import RestartPolicy
from sagellm.runtime.execution_graph.graph import Edge, Graph
from sagellm.runtime.pipeline.cluster import RayCluster
from sagellm.runtime.pipeline.operator import (
    Operator,
    OperatorError,
    SourceOperator,
    get_operator,
    list_operators,
    parameter_types,
)

# Graph-level settings a pipeline may set (graph.attrs), with their types. `model` is what its engine and encode
# nodes serve unless they name their own, `mmproj` a GGUF model's vision encoder beside it (llama.cpp's file),
# `language_model_only` serves a multimodal model's text model alone (vLLM's flag).
# `restart` is the RestartPolicy of the
# worker processes the run starts; `autoscale` the AutoscaleSettings of a gateway serving the graph (it adds and
# removes replicas of the graph's engine); `cluster` the Ray cluster of its `ray:GROUP` groups (`pipeline.cluster`).
# `shared_memory` (default true): tensors between processes on one host go
# through shared memory instead of ZeroMQ frames (`runtime.comm.shared_memory`). The last four are for the sockets of
# a graph run across hosts (transport tcp): the interface this host listens on, the address others reach it at, the
# fixed port of the control socket that workers started on other hosts connect to, and whether links are encrypted
# and authenticated (`is_secure`).
GRAPH_ATTRS: dict[str, Any] = {
    "name": str,
    "description": str,
    "model": str,
    "mmproj": str,
    "language_model_only": bool,
    "transport": Literal["ipc", "tcp"],
    "restart": dict[str, Any],
    "autoscale": dict[str, Any],
    "cluster": dict[str, Any],
    "shared_memory": bool,
    "bind_host": str,
    "advertise_host": str,
    "control_port": int,
    "secure": bool,
}
TCP_ONLY_ATTRS = ("bind_host", "advertise_host", "control_port", "secure")
FILE_KEY = "_file"  # graph.attrs key: the file the graph came from
LOCATIONS_KEY = "_locations"  # graph.attrs key: field path -> line in that file
NODE_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")  # no '.', '->', '[' or ',': ids appear in edges and --set keys
PLACEMENT = re.compile(r"task|(?P<kind>process|remote|ray)(?::(?P<group>[A-Za-z0-9_-]+))?")
PLACEMENTS = "'task', 'process', 'process:GROUP', 'remote:GROUP' or 'ray:GROUP'"
MAIN = "main"  # the process group of nodes placed as tasks: the process that runs the graph
HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")  # an IPv4 address or a host name
WILDCARD_HOST = "0.0.0.0"  # listen on every interface


def placement_group(node_id: str, placement: str) -> tuple[str, str]:
    """(kind, process group) of a node: `task` runs in the process that runs the graph (group MAIN); `process` in a
    process of its own (group = the node id) and `process:NAME` in process NAME, both started by that process;
    `remote:NAME` (or `remote`) in a worker started by hand, possibly on another host (`sagellm worker`); `ray:NAME`
    (or `ray`) in a worker a Ray actor runs, on the graph's Ray cluster (`cluster:`)."""
    match = PLACEMENT.fullmatch(placement) if isinstance(placement, str) else None
    if match is None:
        raise InvalidInput(f"node {node_id!r}: placement {placement!r} must be {PLACEMENTS}")
    if match["kind"] is None:
        return "task", MAIN
    return match["kind"], match["group"] or node_id


def host_problem(host: str, *, wildcard_ok: bool) -> str | None:
    """What is wrong with a host setting (None: nothing). IPv6 is not supported: ZeroMQ needs it switched on."""
    if host == WILDCARD_HOST:
        return None if wildcard_ok else "must be an address other hosts can connect to, not the wildcard 0.0.0.0"
    if not HOST.fullmatch(host):
        return f"{host!r} is not an IPv4 address or a host name" + (" (IPv6 is not supported)" if ":" in host else "")
    return None


def is_loopback(host: str) -> bool:
    """Whether `host` is this host's loopback interface, which no other host can reach."""
    return host == "localhost" or host.startswith("127.")


def is_secure(attrs: dict[str, Any]) -> bool:
    """Whether a run's links use CURVE (encrypted, and only processes holding the run's key connect). By default
    exactly when its sockets listen where other hosts can reach them (tcp on a bind host that is not loopback): ipc and
    loopback tcp keep the faster plaintext path. The graph setting `secure` forces it either way."""
    if attrs.get("transport", "ipc") != "tcp":
        return False
    return attrs.get("secure", not is_loopback(attrs.get("bind_host", "127.0.0.1")))


class PipelineError(InvalidInput):
    """A pipeline graph that cannot run, formatted `{file}:{line}: {field}: {problem}` (unknown parts left out)."""

    def __init__(self, problem: str, *, file: str | None = None, line: int | None = None, field: str | None = None):
        self.problem, self.file, self.line, self.field = problem, file, line, field
        if file is not None:
            where = f"{file}:{line}" if line is not None else file
        else:
            where = f"line {line}" if line is not None else None
        super().__init__(": ".join(part for part in (where, field, problem) if part is not None))


def add_edge(graph: Graph, src: str, dst: str) -> Edge:
    """Appends `src -> dst`; its port is its index among dst's in-edges, which all merge into one input stream."""
    edge = Edge(src, dst, port=sum(e.dst == dst for e in graph.edges))
    graph.edges.append(edge)
    return edge


def same_graph(a: Graph, b: Graph) -> bool:
    """Equality of what a pipeline graph means: nodes, edges in order, and the public attrs (not `_file` etc.)."""
    return a.nodes == b.nodes and a.edges == b.edges and public_attrs(a) == public_attrs(b)


def public_attrs(graph: Graph) -> dict[str, Any]:
    return {k: v for k, v in graph.attrs.items() if not k.startswith("_")}


def validate(graph: Graph, locations: dict[str, int] | None = None, *, file: str | None = None) -> Graph:
    """Raises `PipelineError` at the first problem found; returns the graph so callers can chain.

    `locations` and `file` default to what the front end stored in the graph's attrs."""
    if locations is None:
        locations = graph.attrs.get(LOCATIONS_KEY, {})
    _Validator(graph, locations, file if file is not None else graph.attrs.get(FILE_KEY)).run()
    return graph


class _Validator:
    def __init__(self, graph: Graph, locations: dict[str, int], file: str | None):
        self.graph, self.locations, self.file = graph, locations, file
        self.classes: dict[str, type[Operator]] = {}

    def fail(self, field: str, problem: str, at: str | None = None) -> NoReturn:
        """Raises for `field`, at the line of `at` (default: the field), or of its nearest located parent."""
        key = at or field
        while key and key not in self.locations:
            key = key.rpartition(".")[0]
        raise PipelineError(problem, file=self.file, line=self.locations.get(key), field=field)

    def run(self) -> None:
        self.check_attrs()
        if not self.graph.nodes:
            self.fail("nodes", "the pipeline has no nodes")
        for node_id in self.graph.nodes:
            self.check_node(node_id)
        self.check_groups()
        self.check_edges()
        self.check_cycles()
        self.check_shape()

    def check_attrs(self) -> None:
        for key, value in self.graph.attrs.items():
            if key.startswith("_"):
                continue
            if key not in GRAPH_ATTRS:
                self.fail(key, f"unknown graph setting; the settings are {', '.join(GRAPH_ATTRS)}")
            if not conforms(value, GRAPH_ATTRS[key]):
                self.fail(key, f"expected {describe(GRAPH_ATTRS[key])}, got {type(value).__name__} {value!r}")
            if key in TCP_ONLY_ATTRS and self.graph.attrs.get("transport", "ipc") != "tcp":
                self.fail(key, "applies to sockets on tcp only; set transport: tcp")
        try:
            RestartPolicy.from_settings(self.graph.attrs.get("restart"))
        except FieldError as error:
            self.fail(f"restart.{error.field}", str(error))
        try:
            AutoscaleSettings.from_settings(self.graph.attrs.get("autoscale"))
        except FieldError as error:
            self.fail(f"autoscale.{error.field}", str(error))
        try:
            RayCluster.from_settings(self.graph.attrs.get("cluster"))
        except FieldError as error:
            self.fail(f"cluster.{error.field}", str(error))
        port = self.graph.attrs.get("control_port")
        if port is not None and not 1 <= port <= 65535:
            self.fail("control_port", f"expected a port in 1..65535, got {port}")
        for key in ("bind_host", "advertise_host"):
            problem = key in self.graph.attrs and host_problem(self.graph.attrs[key], wildcard_ok=key == "bind_host")
            if problem:
                self.fail(key, problem)

    def check_node(self, node_id: str) -> None:
        node, at = self.graph.nodes[node_id], f"nodes.{node_id}"
        if not isinstance(node_id, str) or not NODE_ID.fullmatch(node_id):
            self.fail(at, f"node id {node_id!r} must be letters, digits, '_' or '-', not starting with a digit or '-'")
        try:
            cls = self.classes[node_id] = get_operator(node.op)
        except (OperatorError, TypeError):
            self.fail(f"{at}.op", f"unknown operator {node.op!r}; known operators: {', '.join(list_operators())}")
        types_ = parameter_types(cls)
        for pname, value in node.params.items():
            if pname not in types_:
                takes = ", ".join(types_) or "no parameters"
                self.fail(f"{at}.params.{pname}", f"unknown parameter {pname!r}; {node.op} takes {takes}")
            hint = types_[pname][0]
            if not conforms(value, hint):
                got = f"{type(value).__name__} {value!r}"
                self.fail(f"{at}.params.{pname}", f"expected {describe(hint)}, got {got}")
        for pname, (hint, required) in types_.items():
            if required and pname not in node.params:
                self.fail(f"{at}.params", f"{node.op} needs parameter {pname!r} ({describe(hint)})")
        try:  # the constructor's range checks (operators are cheap to build: nothing loads before `open`)
            cls(**node.params)
        except FieldError as error:
            self.fail(f"{at}.params.{error.field}", str(error))
        except ValueError as error:
            self.fail(f"{at}.params", str(error))
        try:
            kind, group = placement_group(node_id, node.placement)
        except ValueError:
            self.fail(f"{at}.placement", f"placement {node.placement!r} must be {PLACEMENTS}")
        if kind != "task" and group == MAIN:
            self.fail(f"{at}.placement", f"group name {MAIN!r} is the process that runs the graph; pick another")
        if kind in ("remote", "ray") and self.graph.attrs.get("transport", "ipc") != "tcp":
            self.fail(f"{at}.placement", f"a {kind} worker connects over tcp; set transport: tcp")

    def check_groups(self) -> None:
        """A process group is started either by the parent (process) or by hand (remote), not both."""
        kinds: dict[str, tuple[str, str]] = {}  # group -> (kind, first node)
        for node_id, node in self.graph.nodes.items():
            kind, group = placement_group(node_id, node.placement)
            first = kinds.setdefault(group, (kind, node_id))
            if first[0] != kind:
                other = f"{first[0]} on node {first[1]!r}"
                self.fail(f"nodes.{node_id}.placement", f"group {group!r} is {kind} here but {other}; pick one")

    def check_edges(self) -> None:
        seen: set[tuple[str, str]] = set()
        for i, e in enumerate(self.graph.edges):
            for end in (e.src, e.dst):
                if end not in self.graph.nodes:
                    nodes = ", ".join(self.graph.nodes)
                    self.fail("edges", f"edge {e.src} -> {e.dst}: no node {end!r}; the nodes are {nodes}", f"edges.{i}")
            if (e.src, e.dst) in seen:
                self.fail("edges", f"edge {e.src} -> {e.dst} is listed twice", f"edges.{i}")
            seen.add((e.src, e.dst))

    def check_cycles(self) -> None:
        """Depth-first search; the first edge back into the current path closes the cycle that gets reported."""
        successors: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for i, e in enumerate(self.graph.edges):
            successors[e.src].append((e.dst, i))
        done: set[str] = set()
        path: list[str] = []

        def visit(node_id: str) -> None:
            path.append(node_id)
            for dst, i in successors[node_id]:
                if dst in path:
                    cycle = " -> ".join([*path[path.index(dst) :], dst])
                    self.fail("edges", f"cycle {cycle}; a pipeline graph must flow one way", f"edges.{i}")
                if dst not in done:
                    visit(dst)
            path.pop()
            done.add(node_id)

        for node_id in self.graph.nodes:
            if node_id not in done:
                visit(node_id)

    def check_shape(self) -> None:
        """At least one source, sources fed by nothing, every other node fed, and fan-out only where allowed."""
        sources = [n for n, cls in self.classes.items() if issubclass(cls, SourceOperator)]
        if not sources:
            self.fail("nodes", "no source node; start the pipeline with a source operator such as prompt_source")
        feeds: dict[str, list[str]] = defaultdict(list)
        fed: set[str] = set()
        for i, e in enumerate(self.graph.edges):
            if e.dst in sources:
                self.fail("edges", f"edge {e.src} -> {e.dst}: source node {e.dst!r} takes no input", f"edges.{i}")
            feeds[e.src].append(e.dst)
            fed.add(e.dst)
        for node_id, node in self.graph.nodes.items():
            at = f"nodes.{node_id}"
            if node_id in sources and not feeds[node_id]:
                self.fail(at, f"node {node_id!r} is not connected: the source feeds no edge")
            if node_id not in sources and node_id not in fed:
                self.fail(at, f"node {node_id!r} is not connected: no edge feeds it")
            if len(feeds[node_id]) > 1 and not self.classes[node_id].multi_output:
                outs = ", ".join(feeds[node_id])
                self.fail(
                    at,
                    f"{node.op} has one output but node {node_id!r} feeds {outs}; "
                    "put a multi_output operator such as route in between",
                )
