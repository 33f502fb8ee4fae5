"""Engines a graph runs on this host in processes of their own share its cores (`runtime.executor.core_shares`):
each process group's engines get an even share as their threads, and cores of their own where each gets two or
more, unless the graph placed any of them itself."""

from __future__ import annotations

import pytest

from sagellm.runtime.executor.core_shares import share_cores
from sagellm.runtime.pipeline.yaml_io import load_pipeline
from tests.gateway.conftest import GRAPHS

TWO_REPLICAS = """
name: two
model: m
transport: tcp
nodes:
  source: {{op: prompt_source}}
  route: {{op: route}}
  engine_a: {{op: engine, placement: process{a_params}}}
  engine_b: {{op: engine, placement: "{b_placement}"}}
  metrics: {{op: metrics_sink}}
edges:
  - source -> route -> [engine_a, engine_b]
  - engine_a -> metrics
  - engine_b -> metrics
"""


def threads(graph) -> dict[str, object]:
    return {node.id: node.params.get("num_threads") for node in graph.nodes.values() if node.op == "engine"}


def two(a_params: str = "", b_placement: str = "process"):
    return load_pipeline(TWO_REPLICAS.format(a_params=a_params, b_placement=b_placement))


def test_two_engine_processes_get_half_the_cores_each_and_pd_s_workers_too():
    graph = two()
    assert share_cores(graph, cores=list(range(8))) == {"engine_a": [0, 1, 2, 3], "engine_b": [4, 5, 6, 7]}
    assert threads(graph) == {"engine_a": 4, "engine_b": 4}
    pd = load_pipeline(GRAPHS / "pd.yaml")
    assert share_cores(pd, cores=[0, 1]) == {}  # a core each: free to move off a core a busy program takes
    assert {n.id: n.params.get("num_threads") for n in pd.nodes.values() if n.op in ("prefill", "decode")} == {
        "prefill": 1,
        "decode": 1,
    }


def test_an_engine_in_the_graphs_own_process_counts_as_one_more_share():
    graph = two(b_placement="task")
    assert share_cores(graph, cores=list(range(4))) == {}  # the graph's own process is not pinned, nor its partner
    assert threads(graph) == {"engine_a": 2, "engine_b": 2}
    graph = two(b_placement="task")
    share_cores(graph, cores=[0, 1, 2])
    assert threads(graph) == {"engine_a": 1, "engine_b": 1}


@pytest.mark.parametrize(
    "a_params", [", params: {num_threads: 1}", ", params: {device_ids: [0]}", ", params: {tp: 2}"],
    ids=["threads", "cores", "parallel"],
)  # fmt: skip
def test_a_graph_that_places_any_engines_threads_itself_is_left_as_written(a_params):
    graph = two(a_params)
    before = threads(graph)
    assert share_cores(graph, cores=list(range(8))) == {}
    assert threads(graph) == before


def test_one_engine_or_engines_on_other_hosts_keep_every_core():
    alone = load_pipeline(GRAPHS / "colocated.yaml")
    share_cores(alone, cores=list(range(8)))
    assert threads(alone) == {"engine": None}
    remote = two(b_placement="remote:gpu1")
    share_cores(remote, cores=list(range(8)))
    assert threads(remote) == {"engine_a": None, "engine_b": None}
