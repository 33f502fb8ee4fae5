"""This host's cores shared among the engines a graph runs on it in processes of their own.

Each engine process sets torch's threads to every core by default. Two of them on one host (a PD graph's prefill and
decode workers, two replicas behind a router) then run twice as many OpenMP threads as there are cores, and every
parallel region waits for a thread the other process holds: on 2 cores two tiny gpt-oss replicas decoding one
request each took 18.6 s for 300 tokens, against 2.4 s for one alone. So each process group that runs engines here
gets an even share of the usable cores as its engines' `num_threads` (vLLM-CPU gives each instance cores of its own
likewise), unless the graph sets the threads, cores or parallelism of any of them itself: then it decides."""

from __future__ import annotations

from typing import Any

import structlog

from sagellm.common.affinity import usable_cores
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.pipeline.operator import get_operator
from sagellm.runtime.pipeline.spec import placement_group

log = structlog.get_logger("sagellm.executor")

LOCAL_KINDS = ("task", "process")  # placements this process runs or starts on this host
PARALLEL = ("tensor_parallel_size", "pipeline_parallel_size", "tp", "pp")  # its ranks share its cores themselves


def share_cores(graph: Graph, cores: int | None = None) -> None:
    """Sets `num_threads` on the engine nodes of `graph` that run on this host, an even share of its `cores`
    (default: the usable ones) per process group that runs any, when two groups or more do."""
    groups: dict[str, list[Any]] = {}
    for node in graph.nodes.values():
        threads_param = get_operator(node.op).threads_param
        kind, group = placement_group(node.id, node.placement)
        if threads_param and kind in LOCAL_KINDS:
            groups.setdefault(group, []).append((node, threads_param))
    if len(groups) < 2 or any(_chosen(node.params) for nodes in groups.values() for node, _ in nodes):
        return
    threads = max(1, (cores or len(usable_cores())) // len(groups))
    for nodes in groups.values():
        for node, threads_param in nodes:
            node.params[threads_param] = threads
    log.info("cores_shared", groups=sorted(groups), threads_each=threads)


def _chosen(params: dict[str, Any]) -> bool:
    """Whether the node's own settings place its threads: a thread count or cores given, or a parallel layout."""
    return (
        params.get("num_threads") is not None
        or bool(params.get("device_ids"))
        or any((params.get(name) or 1) > 1 for name in PARALLEL)
    )
