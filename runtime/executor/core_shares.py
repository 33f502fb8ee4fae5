"""This host's cores shared among the engines a graph runs on it in processes of their own.

Each engine process sets torch's threads to every core by default. Two of them on one host (a PD graph's prefill and
decode workers, two replicas behind a router) then run twice as many OpenMP threads as there are cores, and every
parallel region waits for a thread the other process holds: on 2 cores two tiny gpt-oss replicas decoding one
request each took 18.6 s for 300 tokens, against 2.4 s for one alone. So each process group that runs engines here
gets an even share of the usable cores as its engines' `num_threads` (vLLM-CPU gives each instance cores of its own
likewise), unless the graph sets the threads, cores or parallelism of any of them itself: then it decides. Where
each share is two cores or more, a group's process is also pinned to cores of its own (`shares`: the executor sets
its affinity when it starts it), so one engine's threads never wait behind another's and each engine's thread
governor reads the load of its own cores; with a core each they stay free to move, off a core a busy program takes."""

from __future__ import annotations

from typing import Any

import structlog

from sagellm.common.affinity import usable_cores
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.pipeline.operator import get_operator
from sagellm.runtime.pipeline.spec import MAIN, placement_group

log = structlog.get_logger("sagellm.executor")

LOCAL_KINDS = ("task", "process")  # placements this process runs or starts on this host
PARALLEL = ("tensor_parallel_size", "pipeline_parallel_size", "tp", "pp")  # its ranks share its cores themselves


def share_cores(graph: Graph, cores: list[int] | None = None) -> dict[str, list[int]]:
    """Sets `num_threads` on the engine nodes of `graph` that run on this host, an even share of its `cores`
    (default: the usable ones) per process group that runs any, when two groups or more do; returns the cores each
    of those groups is pinned to, where each gets two or more (none otherwise)."""
    groups: dict[str, list[Any]] = {}
    for node in graph.nodes.values():
        threads_param = get_operator(node.op).threads_param
        kind, group = placement_group(node.id, node.placement)
        if threads_param and kind in LOCAL_KINDS:
            groups.setdefault(group, []).append((node, threads_param))
    if len(groups) < 2 or any(_chosen(node.params) for nodes in groups.values() for node, _ in nodes):
        return {}
    cores = cores or usable_cores()
    threads = max(1, len(cores) // len(groups))
    for nodes in groups.values():
        for node, threads_param in nodes:
            node.params[threads_param] = threads
    # The graph's own process (an engine placed as a task) is not one this executor starts: nothing is pinned then.
    pinned = threads >= 2 and MAIN not in groups
    shares = {g: cores[i * threads : (i + 1) * threads] for i, g in enumerate(sorted(groups))} if pinned else {}
    log.info("cores_shared", groups=sorted(groups), threads_each=threads, pinned=shares or None)
    return shares


def _chosen(params: dict[str, Any]) -> bool:
    """Whether the node's own settings place its threads: a thread count or cores given, or a parallel layout."""
    return (
        params.get("num_threads") is not None
        or bool(params.get("device_ids"))
        or any((params.get(name) or 1) > 1 for name in PARALLEL)
    )
