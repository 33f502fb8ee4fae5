"""Process groups placed `ray:GROUP` on a real local Ray cluster: a head and a second raylet started by the test
(`ray.cluster_utils.Cluster`, each node with its own custom resource, so there are two nodes on this machine). The
prefill and decode groups of a PD graph run as Ray actors, each on the node its resource names, and give the greedy
tokens of the whole graph in one process; a decode worker killed under 16 streams is started again by the run (a new
actor) and the streams resume on it with the same text (0 lost); the autoscaler of a gateway with a cluster adds a
replica on the Ray node its `replicas` group names under a burst and removes it after; the ranks of a TP x PP engine
run as processes of a placement group spread over both nodes and give one process's tokens; a process on a Ray node
runs at our niceness, not Ray's workers' 15; without Ray the start says how to install it."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import httpx
import pytest
import trio

from sagellm import LLM, SamplingParams
from sagellm.common.ray_process import RayMissing, RayProcess
from sagellm.runtime.executor.local import LocalExecutor
from sagellm.runtime.executor.process import ProcessExecutor
from sagellm.runtime.pipeline.yaml_io import load_pipeline
from tests.chaos.test_failover import (
    STREAMS,
    assert_resumed_as_uninterrupted,
    reference_streams,
    retries,
    stream,
    wait_for_streams_midway,
)
from tests.executor.test_remote_workers import free_port, pd_yaml, started
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config
from tests.gateway.test_autoscaler import EXACT, wait_for
from tests.gateway.test_autoscaler import stream as burst_stream
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow  # a Ray cluster of two raylets
ray = pytest.importorskip("ray", reason="Ray is not installed here (the `ray` extra)")
MEGABYTES = 2**20


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 2, "resources": {"node_a": 1}, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={**head, "object_store_memory": 80 * MEGABYTES})
    cluster.add_node(num_cpus=2, resources={"node_b": 1}, object_store_memory=80 * MEGABYTES)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("ray") / "llama")


def ray_pd(model: Path, address: str, port: int, max_tokens: int = 8) -> str:
    groups = "{prefill: {num_cpus: 1, resources: {node_a: 0.5}}, decode: {num_cpus: 1, resources: {node_b: 0.5}}}"
    return pd_yaml(model, port, prefill="ray:prefill", decode="ray:decode", max_tokens=max_tokens) + (
        f"cluster: {{ray: '{address}', groups: {groups}}}\n"
    )


async def test_prefill_and_decode_on_two_ray_nodes_give_the_tokens_of_one_process(cluster, model_path):
    port = free_port()
    executor = ProcessExecutor(load_pipeline(ray_pd(model_path, cluster.address, port)))
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            outcome = await started(nursery, executor)
    assert executor.ray is not None and all(p.poll() is not None for p in executor.processes.values())  # ended
    nodes = executor.ray.placed
    head = cluster.head_node.node_id
    assert nodes["prefill"] == head and nodes["decode"] != head  # each where its resource is
    local = await LocalExecutor(load_pipeline(pd_yaml(model_path, port, prefill="task", decode="task"))).run()
    result = outcome["result"]
    assert {r: o.token_ids for r, o in result.outcomes.items()} == {r: o.token_ids for r, o in local.outcomes.items()}
    assert all(o.finish_reason == "length" and len(o.token_ids) == 8 for o in result.outcomes.values())


def test_without_ray_a_graph_with_ray_groups_fails_at_start_saying_how_to_install_it(model_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as where Ray is not installed
    executor = ProcessExecutor(load_pipeline(ray_pd(model_path, "auto", free_port())), startup_timeout_s=30)
    with pytest.raises(RayMissing, match=r"install Ray: pip install 'sagellm\[ray\]'"):
        trio.run(executor.run)


def test_a_killed_ray_worker_is_started_again_and_the_streams_on_it_resume_with_the_same_text(cluster, tmp_path):
    """Through the gateway: 8 greedy streams, the decode worker's process on its Ray node killed (SIGKILL) once every
    stream has tokens. The run's supervision starts it again on the cluster (a new actor), it rejoins the run, and
    the failover resumes each stream there from its prompt and the tokens so far: every stream ends once, with the
    text an uninterrupted run gives."""
    model = make_tiny_llama(tmp_path / "long", max_position_embeddings=4096)
    graph = tmp_path / "ray_pd.yaml"
    graph.write_text(ray_pd(model, cluster.address, free_port(), max_tokens=300))
    with running_gateway(graph, tiny_config(tmp_path)) as gw:
        executor = gw.core.executor
        texts: dict[int, list] = {}
        outcomes: dict[int, list[str]] = {}
        threads = [threading.Thread(target=stream, args=(gw.url, i, outcomes, texts)) for i in range(STREAMS)]
        for thread in threads:
            thread.start()
        wait_for_streams_midway(texts, outcomes, more_than=2)  # (one decode worker: every stream is on it)
        first_pid = executor.processes["decode"].pid
        os.kill(first_pid, signal.SIGKILL)
        for thread in threads:
            thread.join(REPLY_TIMEOUT_S)
        assert not any(thread.is_alive() for thread in threads), "a stream hung"
        assert outcomes == {i: ["length"] for i in range(STREAMS)}  # every stream finished, once
        assert executor.processes["decode"].pid != first_pid and executor.supervisions["decode"].restarts.total == 1
        assert retries(gw.url).get(("instance_lost", "true"), 0) >= 1
        assert_resumed_as_uninterrupted(texts, reference_streams(gw.url))


def test_the_autoscaler_adds_a_replica_on_a_ray_node_under_a_burst_and_removes_it_after(cluster, tmp_path):
    """1 -> 2 -> 1 instances: the graph's engine in the gateway's process, a replica's worker (of the gateway's graph)
    started by a Ray actor on the second node (its `replicas` group asks for that node's resource); every stream ends
    once, its text beginning with the offline API's first `EXACT` greedy tokens (see
    tests/gateway/test_autoscaler.py); the quiet after drains the replica and its actor is gone with it."""
    model = make_tiny_llama(tmp_path / "llama", max_position_embeddings=2048)
    scaling = {"min_instances": 1, "max_instances": 2, "up_waiting_per_instance": 1, "up_cooldown_s": 0,
               "down_delay_s": 2, "interval_s": 0.25}  # fmt: skip
    groups = {"replicas": {"num_cpus": 1, "resources": {"node_b": 0.5}}}
    attrs = {"autoscale": scaling, "cluster": {"ray": cluster.address, "groups": groups}}
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path), model, attrs=attrs,
                         **{"engine.max_num_seqs": 2}) as gw:  # fmt: skip
        scaler, engines = gw.gateway.autoscaler, gw.gateway.engines
        texts: dict[int, str] = {}
        ends: dict[int, list[str]] = {}
        ids: dict[int, str] = {}
        burst = [threading.Thread(target=burst_stream, args=(gw.url, i, texts, ends, ids)) for i in range(16)]
        for thread in burst:
            thread.start()
        wait_for(lambda: scaler.decisions["up"] == 1, "a replica added")
        (replica,) = scaler.replicas
        wait_for(lambda: engines.engines[replica].state == "ready", "the replica ready", timeout_s=180)
        link = engines.engines[replica].link  # a worker of the gateway's graph, on the Ray node
        group = link.hosted.group  # the replica's own, hosted by the gateway's executor, placed by `replicas`
        process = link.executor.processes[group]
        assert isinstance(process, RayProcess) and process.node_id() != cluster.head_node.node_id
        assert link.executor.ray.groups[group] == "replicas" and link.executor.ray.placed[group] == process.node_id()
        wave = [threading.Thread(target=burst_stream, args=(gw.url, i, texts, ends, ids)) for i in range(16, 24)]
        for thread in wave:
            thread.start()
        for thread in burst + wave:
            thread.join(REPLY_TIMEOUT_S)
        assert not any(thread.is_alive() for thread in burst + wave), "a stream hung"
        assert ends == {i: ["length"] for i in range(24)}  # every stream ended, once
        served_by = {httpx.get(f"{gw.url}/v1/requests/{ids[i]}").json()["instance"] for i in range(24)}
        assert served_by == {"engine", replica}
        wait_for(lambda: scaler.decisions["down"] == 1 and not scaler.replicas, "the replica drained")
        assert process.returncode is not None
        with pytest.raises(ray.exceptions.RayActorError):
            process.node_id()  # its actor is gone with its worker
    prompts = [f"burst {i}" for i in range(24)]
    offline = LLM(str(model)).generate(prompts, SamplingParams(max_tokens=EXACT, temperature=0, ignore_eos=True))
    assert [texts[i][: len(o.outputs[0].text)] for i, o in enumerate(offline)] == [o.outputs[0].text for o in offline]


def test_tensor_and_pipeline_parallel_ranks_as_ray_actors_give_the_tokens_of_one_process(
    cluster, model_path, monkeypatch
):
    """TP=2 x PP=2 with `distributed_executor_backend="ray"`: ranks 1..3 are processes of a placement group spread
    over both raylets, gloo over TCP between them and rank 0 here; greedy tokens equal one process's."""
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    prompts = ["the ray ranks", "a second prompt, a little longer than the first"]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in LLM(str(model_path)).generate(prompts, greedy)]
    split = LLM(str(model_path), tensor_parallel_size=2, pipeline_parallel_size=2, distributed_executor_backend="ray")
    try:
        ranks = split.engine.runner.ranks
        assert len(ranks) == 3 and all(isinstance(rank, RayProcess) for rank in ranks)
        assert {rank.node_id() for rank in ranks} == {node.node_id for node in cluster.list_all_nodes()}
        assert [o.outputs[0].token_ids for o in split.generate(prompts, greedy)] == alone
    finally:
        split.engine.close()
    assert all(rank.returncode is not None for rank in ranks)  # stopped with the engine


def test_a_process_on_a_ray_node_runs_until_killed_and_one_that_cannot_start_says_why(cluster):
    ray.init(address=cluster.address, ignore_reinit_error=True)
    options = {"num_cpus": 0.1, "resources": {"node_b": 0.1}}
    sleeper = RayProcess.launch(options, lambda host, port: ["sleep", "60"], {}, timeout_s=60)
    assert sleeper.poll() is None and sleeper.node_id() != cluster.head_node.node_id
    niceness = int(Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    assert niceness == os.getpriority(os.PRIO_PROCESS, 0)  # not Ray's 15 for its workers: a server runs as we do
    sleeper.kill()
    assert sleeper.join(30) == -signal.SIGKILL and sleeper.returncode == -signal.SIGKILL
    with pytest.raises(RuntimeError, match="Ray could not start the process: .*no-such-server"):
        RayProcess.launch(options, lambda host, port: ["/nonexistent/no-such-server"], {}, timeout_s=60)
