"""Pipeline graphs as YAML files: `load_pipeline` reads one into the IR `Graph`, `dump_pipeline` writes one back.

    name: pd                          # graph-level settings (spec.GRAPH_ATTRS) go into graph.attrs
    model: smollm2-135m-instruct
    transport: ipc
    nodes:                            # node id -> operator; ids keep their order
      source: {op: prompt_source}
      admission: {op: admission, params: {max_queue: 256}}
      prefill: {op: prefill, placement: "process:prefill"}
    edges:
      - source -> admission -> sort   # a chain
      - route -> [prefill, decode]    # fan-out

The file is read with `yaml.compose`, not `safe_load`, so every key keeps its line: an error names the file, the
line and the field (`pd.yaml:9: nodes.route.params.strategy: expected one of ...`). Duplicate keys, which plain YAML
loading silently overwrites, are errors. `overrides` are the CLI's `--set node.param=value` (or `--set model=...`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NoReturn

import yaml

from sagellm.runtime.execution_graph.graph import Graph, Node
from sagellm.runtime.pipeline.spec import FILE_KEY, GRAPH_ATTRS, LOCATIONS_KEY, PipelineError, add_edge, public_attrs
from sagellm.runtime.pipeline.spec import validate as validate_graph

TOP_KEYS = (*GRAPH_ATTRS, "nodes", "edges")
NODE_KEYS = ("op", "params", "placement")
EDGE_SYNTAX = "an edge is a string like 'a -> b' or 'a -> [b, c] -> d'"


def load_pipeline(path_or_text: str | Path, *, overrides: dict[str, Any] | None = None, validate: bool = True) -> Graph:
    """Reads a pipeline graph from a file (a Path, or a str without a newline) or from YAML text.

    `overrides` maps `node.param` or a graph setting to a value (a str is parsed as a YAML scalar, as `--set` gives
    it). `validate=False` skips the registry and graph checks (the YAML itself is always checked)."""
    if isinstance(path_or_text, Path) or "\n" not in path_or_text:
        file = str(path_or_text)
        try:
            text = Path(path_or_text).read_text()
        except OSError as e:
            raise PipelineError(f"cannot read the pipeline file: {e.strerror}", file=file) from None
    else:
        file, text = None, path_or_text
    graph = _Reader(text, file).read()
    if file is not None:
        graph.attrs.setdefault("name", Path(file).stem)
    overridden = _apply_overrides(graph, overrides or {})
    if validate:
        try:
            validate_graph(graph)
        except PipelineError as e:
            if e.field in overridden:  # the value came from the command line, not from the file
                raise PipelineError(e.problem, field=f"--set {overridden[e.field]}") from None
            raise
    return graph


def dump_pipeline(graph: Graph) -> str:
    """The graph in the format `load_pipeline` reads; edges are written as chains in their original order."""
    attrs = public_attrs(graph)
    keys = [k for k in GRAPH_ATTRS if k in attrs] + [k for k in attrs if k not in GRAPH_ATTRS]
    lines = [f"{_flow(key)}: {_flow(attrs[key])}" for key in keys]
    lines.append("nodes:")
    for node in graph.nodes.values():
        spec: dict[str, Any] = {"op": node.op}
        if node.params:
            spec["params"] = node.params
        if node.placement != "task":
            spec["placement"] = node.placement
        try:
            lines.append(f"  {_flow(node.id)}: {_flow(spec)}")
        except yaml.YAMLError as e:
            raise PipelineError(f"a parameter cannot be written as YAML: {e}", field=f"nodes.{node.id}") from None
    lines.append("edges:" if graph.edges else "edges: []")
    lines.extend(f"  - {_chain_text(chain)}" for chain in _chains(graph))
    return "\n".join(lines) + "\n"


def _flow(value: Any) -> str:
    """One YAML value on one line (flow style); continuation lines of a multi-line string are indented to parse."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=math.inf, allow_unicode=True)
    return text.removesuffix("\n...\n").strip().replace("\n", "\n    ")


def _chains(graph: Graph) -> list[list[list[str]]]:
    """Groups consecutive edges into chains of segments that expand back into exactly the same edges, in order:
    `a->b, b->c` becomes `a -> b -> c`, and `a->b, a->c` becomes `a -> [b, c]`."""
    chains: list[list[list[str]]] = []
    for e in graph.edges:
        chain = chains[-1] if chains else None
        if chain and chain[-1] == [e.src]:
            chain.append([e.dst])
        elif chain and len(chain) >= 2 and chain[-2] == [e.src]:
            chain[-1].append(e.dst)
        else:
            chains.append([[e.src], [e.dst]])
    return chains


def _chain_text(chain: list[list[str]]) -> str:
    return " -> ".join(seg[0] if len(seg) == 1 else f"[{', '.join(seg)}]" for seg in chain)


def _apply_overrides(graph: Graph, overrides: dict[str, Any]) -> dict[str, str]:
    """Sets each override; returns field path -> override key, so a validation error can name the `--set`."""
    overridden: dict[str, str] = {}
    for key, raw in overrides.items():
        try:
            value = yaml.safe_load(raw) if isinstance(raw, str) else raw
        except yaml.YAMLError:
            raise PipelineError(f"cannot read value {raw!r} as YAML", field=f"--set {key}") from None
        node_id, dot, param = key.partition(".")
        if not dot:
            if key not in GRAPH_ATTRS:
                settings = ", ".join(GRAPH_ATTRS)
                raise PipelineError(f"unknown graph setting; use one of {settings} or NODE.PARAM", field=f"--set {key}")
            graph.attrs[key] = value
            overridden[key] = key
        elif node_id not in graph.nodes or not param:
            raise PipelineError(f"no node {node_id!r}; the nodes are {', '.join(graph.nodes)}", field=f"--set {key}")
        else:
            graph.nodes[node_id].params[param] = value
            overridden[f"nodes.{node_id}.params.{param}"] = key
    return overridden


class _Reader:
    """Walks the composed YAML node tree, recording the line of every key it reads."""

    def __init__(self, text: str, file: str | None):
        self.file, self.text = file, text
        self.loader = yaml.SafeLoader(text)
        self.locations: dict[str, int] = {}

    def fail(self, node: yaml.Node | None, field: str | None, problem: str) -> NoReturn:
        line = node.start_mark.line + 1 if node is not None else None
        raise PipelineError(problem, file=self.file, line=line, field=field)

    def value(self, node: yaml.Node) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as e:  # a tag safe YAML does not build (`!!python/object/...`), a bad timestamp
            problem = getattr(e, "problem", None) or str(e)
            self.fail(node, None, f"cannot read this value: {' '.join(problem.split())}")

    def mapping(self, node: yaml.Node, field: str | None, what: str) -> list[tuple[Any, yaml.Node, yaml.Node]]:
        """(key, key node, value node) of a YAML mapping; duplicate keys are errors."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, field, f"expected {what}")
        first_line: dict[Any, int] = {}
        items = []
        for key_node, value_node in node.value:
            key = self.value(key_node)
            if key in first_line:
                where = f"{field}.{key}" if field else str(key)
                self.fail(key_node, where, f"duplicate key (first on line {first_line[key]}); keep one")
            first_line[key] = key_node.start_mark.line + 1
            items.append((key, key_node, value_node))
        return items

    def read(self) -> Graph:
        try:
            self.refuse_aliases()
            root = self.loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark is not None else None
            raise PipelineError(f"invalid YAML: {e.problem or e.context}", file=self.file, line=line) from None
        if root is None:
            self.fail(None, None, "the pipeline is empty; it needs nodes and edges")
        self.deep_duplicates(root, None)
        graph = Graph()
        for key, key_node, value_node in self.mapping(root, None, "a mapping with nodes and edges"):
            if key not in TOP_KEYS:
                self.fail(key_node, str(key), f"unknown top-level key; use {', '.join(TOP_KEYS)}")
            self.locations[key] = key_node.start_mark.line + 1
            if key == "nodes":
                self.read_nodes(graph, value_node)
            elif key == "edges":
                self.read_edges(graph, value_node)
            else:
                graph.attrs[key] = self.value(value_node)
        if "nodes" not in self.locations:
            self.fail(root, "nodes", "missing; a pipeline needs nodes and edges")
        if self.file is not None:
            graph.attrs[FILE_KEY] = self.file
        graph.attrs[LOCATIONS_KEY] = self.locations
        return graph

    def refuse_aliases(self) -> None:
        """Anchors and aliases (`&a`, `*a`) are refused before anything is built: a graph never needs them, and a
        few lines of nested aliases expand to billions of items (an alias bomb) that no check should walk."""
        for event in yaml.parse(self.text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                line = event.start_mark.line + 1
                raise PipelineError(
                    "anchors and aliases (&, *) are not supported in a pipeline file", file=self.file, line=line
                )

    def deep_duplicates(self, node: yaml.Node, field: str | None) -> None:
        """Duplicate keys anywhere (inside params too), which YAML would otherwise resolve to the last one."""
        if isinstance(node, yaml.MappingNode):
            for key, _, value_node in self.mapping(node, field, "a mapping"):
                self.deep_duplicates(value_node, f"{field}.{key}" if field else str(key))
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self.deep_duplicates(item, field)

    def read_nodes(self, graph: Graph, nodes: yaml.Node) -> None:
        for node_id, key_node, spec_node in self.mapping(nodes, "nodes", "a mapping of node id to {op: ...}"):
            at = f"nodes.{node_id}"
            if not isinstance(node_id, str):
                self.fail(key_node, at, f"node id {node_id!r} must be a string; quote it")
            self.locations[at] = key_node.start_mark.line + 1
            spec: dict[str, Any] = {}
            for key, spec_key_node, value_node in self.mapping(spec_node, at, "a mapping like {op: admission}"):
                if key not in NODE_KEYS:
                    self.fail(spec_key_node, f"{at}.{key}", f"unknown node key; use {', '.join(NODE_KEYS)}")
                self.locations[f"{at}.{key}"] = spec_key_node.start_mark.line + 1
                if key == "params" and value_node.tag != "tag:yaml.org,2002:null":
                    for pname, pkey_node, _ in self.mapping(value_node, f"{at}.params", "a mapping of parameters"):
                        self.locations[f"{at}.params.{pname}"] = pkey_node.start_mark.line + 1
                spec[key] = self.value(value_node)
            if "op" not in spec:
                self.fail(key_node, at, "missing op: the operator's registry name")
            graph.nodes[node_id] = Node(node_id, spec["op"], spec.get("params") or {}, spec.get("placement", "task"))

    def read_edges(self, graph: Graph, edges: yaml.Node) -> None:
        if not isinstance(edges, yaml.SequenceNode):
            self.fail(edges, "edges", f"expected a list; {EDGE_SYNTAX}")
        for item in edges.value:
            text = self.value(item)
            if not isinstance(text, str):
                self.fail(item, "edges", f"{EDGE_SYNTAX}, got {text!r}")
            segments = [_segment(part.strip()) for part in text.split("->")]
            if len(segments) < 2 or not all(all(segment) for segment in segments):
                self.fail(item, "edges", f"{EDGE_SYNTAX}, got {text!r}")
            for srcs, dsts in zip(segments, segments[1:]):
                for src in srcs:
                    for dst in dsts:
                        self.locations[f"edges.{len(graph.edges)}"] = item.start_mark.line + 1
                        add_edge(graph, src, dst)


def _segment(part: str) -> list[str]:
    """One step of a chain, `a` or `[a, b]`, as node ids (an empty id marks a malformed chain)."""
    return [i.strip() for i in part[1:-1].split(",")] if part.startswith("[") and part.endswith("]") else [part]
