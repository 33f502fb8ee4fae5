"""The graph a gateway serves: the user's graph (default `graphs/colocated.yaml`) made to take requests from HTTP.

Its source nodes give way to one `http_source`, the sinks that write replies out themselves (stdout, a JSONL file)
are dropped, and a `remote_engine` node is added beside its engines (fed by its routes, feeding its metrics sink),
so the same YAML runs as a batch job with `sagellm run` and as a server with `sagellm serve`. A graph with a Ray
`cluster:` listens on tcp (on every interface, unless it names its `bind_host`), where the engines the gateway places
there reach it. Nodes are chosen by their operator's class and traits, never by name, so an operator of another
package fits the same way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sagellm.common.errors import InvalidInput
from sagellm.operators.embedding import EmbeddingOperator, served_name
from sagellm.operators.http_source import HttpSource
from sagellm.operators.metrics_sink import MetricsSink
from sagellm.operators.remote_engine import RemoteEngine
from sagellm.operators.route import Route
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.pipeline.operator import SourceOperator, get_operator, nodes_running
from sagellm.runtime.pipeline.spec import WILDCARD_HOST

SOURCE_NODE = "http"
REMOTE_NODE = "remote"
EMBEDDING_NODE = "embedding"
POOLING_NODE = "pooling"  # pooling-1, pooling-2, ...: --pooling-model's nodes


def served_graph(graph: Graph, embedding_model: str | None = None, pooling_models: Sequence[str] = ()) -> Graph:
    """The graph with one `http_source` in place of its sources, without the sinks that write replies themselves,
    with the node that serves instances attached at run time and, given `embedding_model` and `pooling_models`
    (rerankers, classifiers, more embedding models), an embedding node for each beside its engines."""
    graph = graph.copy()
    sources = nodes_running(graph, SourceOperator)
    if not sources:
        raise InvalidInput("the graph has no source node for the gateway to take the place of")
    targets = graph.successors(sources)
    writers = [node.id for node in graph.nodes.values() if get_operator(node.op).writes_replies]
    for node_id in sources + writers:
        graph.remove_node(node_id)
    graph.add(HttpSource.name, id=SOURCE_NODE)
    for target in targets:
        graph.connect(SOURCE_NODE, target)
    _add_beside_engines(graph, RemoteEngine.name, REMOTE_NODE)
    pooling = [(EMBEDDING_NODE, embedding_model)] if embedding_model else []
    pooling += [(f"{POOLING_NODE}-{i}", model) for i, model in enumerate(pooling_models, 1)]
    names = [served_name(model) for _, model in pooling]
    if len(set(names)) < len(names):
        raise InvalidInput(f"two pooling models are served as one name: {', '.join(names)}")
    for (node_id, model), name in zip(pooling, names):
        params = {"model": model, "served_model_name": name}
        if not _add_beside_engines(graph, EmbeddingOperator.name, node_id, **params):
            raise InvalidInput("the graph has no route in the gateway's process to send embedding requests to")
    if "cluster" in graph.attrs and graph.attrs.get("transport") != "tcp":  # the engines it places there reach it
        graph.attrs["transport"] = "tcp"
        graph.attrs.setdefault("bind_host", WILDCARD_HOST)
    remote = [node_id for node_id in graph.leaves() if graph.nodes[node_id].placement != "task"]
    if remote:
        raise InvalidInput(f"the gateway reads replies in its own process; place the leaf nodes {remote} as `task`")
    return graph


def _add_beside_engines(graph: Graph, op: str, node_id: str, **params: Any) -> bool:
    """Adds a node fed by every route of this process (a route in a worker process cannot see what is attached
    here) and feeding the first metrics sink; False when there is no such route."""
    routes = [r for r in nodes_running(graph, Route) if graph.nodes[r].placement == "task"]
    if not routes:
        return False
    graph.add(op, id=node_id, **params)
    for route in routes:
        graph.connect(route, node_id)
    sinks = nodes_running(graph, MetricsSink)
    if sinks:
        graph.connect(node_id, sinks[0])
    return True
