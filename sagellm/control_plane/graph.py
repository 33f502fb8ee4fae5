"""The gateway graph a `ControlPlaneManager` runs, made from its constructor's settings.

The manager is a face over the gateway's own pipeline: its settings are parameters of the shipped graphs' nodes
(policy_sort's policy, route's strategy, pd_split's threshold and ratio, each PD role's devices), and what is turned
off (PD separation, monitoring) is taken out of the graph, so the gateway runs it as it runs any graph."""

from __future__ import annotations

from typing import Any

from sagellm import graphs
from sagellm.control_plane.policies import SchedulingPolicy, policy_name
from sagellm.control_plane.types import PDSeparationConfig


def control_plane_graph(
    model: str | None,
    scheduling_policy: str | SchedulingPolicy,
    routing_strategy: str,
    pd_config: PDSeparationConfig,
    *,
    pd_separation: bool,
    monitoring: bool,
) -> Any:
    """The graph for `model` (engines of our own: the shipped colocated graph, or the prefill/decode graph with PD
    separation on) or, without one, the shipped control_plane graph over registered instances only."""
    from sagellm.runtime.pipeline.yaml_io import load_pipeline

    pd_on = pd_separation and pd_config.enabled
    if model is not None:
        graph = load_pipeline(graphs.find("pd" if pd_on else "colocated"))
        graph.attrs["model"] = model
    else:
        graph = load_pipeline(graphs.find("control_plane"))
    for node in graph.nodes.values():
        if node.op == "policy_sort":
            node.params["policy"] = policy_name(scheduling_policy)
        elif node.op == "route":
            node.params["strategy"] = routing_strategy
        elif node.op == "pd_split":
            node.params.update(pd_config.pd_split_params())
        elif node.op in ("prefill", "decode"):
            devices = getattr(pd_config, f"{node.op}_device_ids")
            if devices is not None:
                node.params["device_ids"] = devices
    if not pd_on:
        for node_id in [n.id for n in graph.nodes.values() if n.op == "pd_split"]:
            _bypass(graph, node_id)
    if not monitoring:
        for node_id in [n.id for n in graph.nodes.values() if n.op == "metrics_sink"]:
            graph.remove_node(node_id)
    return graph


def _bypass(graph: Any, node_id: str) -> None:
    """Takes a one-input node out of the graph, its readers reading its input instead."""
    from sagellm.runtime.execution_graph.graph import Value

    into = next(e for e in graph.edges if e.dst == node_id)
    graph.redirect(Value(node_id, 0), Value(into.src, into.src_port))
    graph.remove_node(node_id)
