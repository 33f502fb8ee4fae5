"""The Python control-plane API over real servers on 127.0.0.1 (two gateways on the same tiny weights): the seed
API's async example as written, instances registered by address (a request right after start not lost), requests
submitted with priorities and followed to their end, the same requests' status over HTTP, typed metrics, health
checks, an instance unregistered while serving; and what it refuses, with the reason."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from sagellm.common.processes import alive
from sagellm.control_plane import (
    ControlPlaneManager,
    DecodingConfig,
    ExecutionInstance,
    ExecutionInstanceType,
    PDSeparationConfig,
    PrefillingConfig,
    PriorityPolicy,
    RequestMetadata,
    RequestPriority,
    RequestStatus,
    SchedulingDecision,
    SchedulingPolicy,
)
from sagellm.control_plane.gpus import gpu_utilization
from sagellm.control_plane.graph import control_plane_graph
from sagellm.runtime.comm.topology import gpu_inventory
from tests.fake_nvml import FakeGpu, FakeNvml
from tests.gateway.test_third_party_engines import FAKE_VLLM, executable

PROMPT = "Tell me about the sea."


def instance(name: str, url: str, **fields) -> ExecutionInstance:
    host, port = url.removeprefix("http://").split(":")
    return ExecutionInstance(name, host, int(port), model_name="upstream", **fields)


@pytest.mark.slow
def test_requests_run_on_registered_instances_and_are_followed_to_their_end(upstreams):
    first, second = upstreams
    direct = openai.OpenAI(base_url=first.url + "/v1", api_key="unused", max_retries=0)
    expected = direct.completions.create(model="upstream", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    cp = ControlPlaneManager(scheduling_policy="priority", routing_strategy="round_robin")
    cp.register_instance(instance("a", first.url, max_concurrent_requests=8))  # before start: registered at start
    with cp:
        cp.register_instance(instance("b", second.url))
        assert cp.sync.health_check_all() == {"a": True, "b": True}
        priorities = [RequestPriority.LOW, RequestPriority.CRITICAL, RequestPriority.NORMAL, RequestPriority.HIGH]
        ids = [
            cp.sync.submit_request(RequestMetadata(f"r{i}", PROMPT, priority=p, max_tokens=8, temperature=0))
            for i, p in enumerate(priorities)
        ]
        done = [cp.sync.wait(request_id) for request_id in ids]
        assert [(r.status, r.text, r.finish_reason) for r in done] == [
            (RequestStatus.COMPLETED, expected, "length")
        ] * 4
        assert {r.instance_id for r in done} == {"a", "b"}  # round robin over both
        assert cp.sync.get_request_status("r1") is RequestStatus.COMPLETED

        over_http = httpx.get(f"{cp.url}/v1/requests/r1").json()
        assert over_http["status"] == "completed" and over_http["instance"] in ("a", "b")
        body = {"model": "upstream", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "priority": "critical"}
        reply = httpx.post(f"{cp.url}/v1/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["text"] == expected  # the HTTP twin takes the same path
        assert httpx.get(f"{cp.url}/v1/requests/{reply['id']}").json()["status"] == "completed"
        assert httpx.get(f"{cp.url}/v1/requests/nope").status_code == 404

        metrics = cp.get_metrics()
        assert metrics.completed_requests == 5 and metrics.total_requests == 5 and metrics.failed_requests == 0
        assert metrics.avg_latency_ms > 0 and metrics.p99_latency_ms >= metrics.p50_latency_ms > 0
        assert metrics.avg_gpu_utilization is None  # no GPU here: unknown, not 0
        assert metrics.metadata["in_flight"] == 0 and set(metrics.metadata["instances"]) == {"a", "b"}
        assert {i.instance_id: i.is_healthy for i in cp.get_instances()} == {"a": True, "b": True}

        cp.unregister_instance("a")
        after = cp.sync.wait(cp.sync.submit_request(RequestMetadata("after", PROMPT, max_tokens=8, temperature=0)))
        assert (after.status, after.instance_id, after.text) == (RequestStatus.COMPLETED, "b", expected)
        with pytest.raises(ValueError, match="in use"):
            cp.sync.submit_request(RequestMetadata("after", PROMPT))
        assert cp.sync.get_request_status("unknown") is None


@pytest.mark.slow
def test_the_seeds_async_example_runs_as_written(upstreams):
    """The seed API's own example (its main() with asyncio), the import line changed: a server registered by
    address with only its id, host, port and model, a request without an id, the metrics' attributes."""
    host, port = upstreams[0].url.removeprefix("http://").split(":")

    async def main() -> tuple:
        manager = ControlPlaneManager(scheduling_policy="adaptive", routing_strategy="load_balanced",
                                      enable_monitoring=True, mode="http")  # fmt: skip
        manager.register_instance(ExecutionInstance(
            instance_id="vllm-1", host=host, port=int(port), model_name="upstream", tensor_parallel_size=2,
            gpu_count=2, max_concurrent_requests=100,
        ))  # fmt: skip
        await manager.start()
        request_id = await manager.submit_request(RequestMetadata(
            request_id="req-001", user_id="user-123", priority=RequestPriority.HIGH, slo_deadline_ms=60_000,
            max_tokens=8, prompt=PROMPT,
        ))  # fmt: skip
        unnamed = await manager.submit_request(RequestMetadata(prompt=PROMPT, max_tokens=4, priority="low"))
        results = [await manager.wait(request_id), await manager.wait(unnamed)]
        status = await manager.get_request_status(request_id)
        metrics = manager.get_metrics()
        await manager.stop()
        return request_id, unnamed, results, status, metrics

    request_id, unnamed, results, status, metrics = asyncio.run(main())
    assert request_id == "req-001" and unnamed.startswith("req-")
    assert [r.status for r in results] == [RequestStatus.COMPLETED] * 2 and status is RequestStatus.COMPLETED
    assert metrics.completed_requests == 2 and metrics.requests_per_second > 0 and metrics.slo_compliance_rate == 1.0


@pytest.mark.slow
def test_a_request_right_after_start_is_not_lost(upstreams, tiny_model):
    """An instance registered by address with no model name (asked of it), started and at once sent a request, five
    times over: each completes, none retried."""
    host, port = upstreams[1].url.removeprefix("http://").split(":")
    for run in range(5):
        cp = ControlPlaneManager(routing_strategy="round_robin")
        cp.register_instance(ExecutionInstance(f"i{run}", host, int(port)))
        with cp:
            result = cp.sync.wait(cp.sync.submit_request(RequestMetadata(prompt=PROMPT, max_tokens=4)))
        assert (result.status, result.retries) == (RequestStatus.COMPLETED, 0), result


def test_what_the_api_refuses_says_why(upstreams):
    cp = ControlPlaneManager()
    with pytest.raises(RuntimeError, match="call start"):
        cp.get_metrics()
    with pytest.raises(ValueError, match="mode 'local'"):
        ControlPlaneManager(mode="local")
    with pytest.raises(ValueError, match="enable_auto_scaling=True: not taken here"):
        ControlPlaneManager(enable_auto_scaling=True)
    with pytest.raises(ValueError, match="routing_policy: 'ml' is not one of adaptive, threshold"):
        PDSeparationConfig(enabled=True, routing_policy="ml")
    with pytest.raises(ValueError, match="instance_type: 'router' is not one of GENERAL"):
        ExecutionInstance("x", instance_type="router")


@pytest.mark.slow
def test_the_seeds_pd_example_splits_a_prompt_across_the_two_servers(upstreams):
    """The seed's PD example as written (addresses aside): a PREFILLING and a DECODING server registered by address,
    their configs, `PDSeparationConfig(enabled=True, routing_policy="adaptive", ...)`. A prompt-heavy request is
    prefilled on one, its KV moved to the other, which decodes it: the greedy text of one server alone."""
    prefill, decode = upstreams
    long = "The history of the river begins with the melting of a glacier far upstream. " * 2
    direct = openai.OpenAI(base_url=decode.url + "/v1", api_key="unused", max_retries=0)
    expected = direct.completions.create(model="upstream", prompt=long, max_tokens=4, temperature=0).choices[0].text
    address = lambda server: dict(zip(("host", "port"), server.url.removeprefix("http://").split(":")))  # noqa: E731
    fetched = prefill.core.kv_outbox.fetched

    async def main() -> tuple:
        pd_config = PDSeparationConfig(enabled=True, routing_policy="adaptive", prefilling_threshold_input_tokens=800)
        manager = ControlPlaneManager(scheduling_policy="adaptive", enable_pd_separation=True, pd_config=pd_config)
        prefilling_instance = ExecutionInstance(
            instance_id="prefill-1", host=address(prefill)["host"], port=int(address(prefill)["port"]),
            model_name="upstream", instance_type=ExecutionInstanceType.PREFILLING, tensor_parallel_size=4, gpu_count=4,
            prefilling_config=PrefillingConfig(target_batch_size=64, enable_chunked_prefill=True),
        )  # fmt: skip
        decoding_instance = ExecutionInstance(
            instance_id="decode-1", host=address(decode)["host"], port=int(address(decode)["port"]),
            model_name="upstream", instance_type=ExecutionInstanceType.DECODING, tensor_parallel_size=1, gpu_count=1,
            decoding_config=DecodingConfig(target_latency_ms=50, max_parallel_requests=200),
        )  # fmt: skip
        manager.register_instance(prefilling_instance)
        manager.register_instance(decoding_instance)
        await manager.start()
        heavy = await manager.submit_request(RequestMetadata(prompt=long, max_tokens=4, temperature=0))
        light = await manager.submit_request(RequestMetadata(prompt="Hi.", max_tokens=4, temperature=0))
        results = [await manager.wait(heavy), await manager.wait(light)]
        await manager.stop()
        return results

    heavy, light = asyncio.run(main())
    assert (heavy.status, heavy.text, heavy.instance_id) == (RequestStatus.COMPLETED, expected, "decode-1")
    assert prefill.core.kv_outbox.fetched == fetched + 1  # only the prompt-heavy one was split
    assert (light.status, light.instance_id) == (RequestStatus.COMPLETED, "decode-1")  # a decode server runs it whole


def test_pd_separation_gives_each_role_its_devices_and_the_adaptive_ratio(tiny_model):
    """The seeds' per-role device ids land on the prefill and decode nodes as `device_ids` (their cores here), and
    "adaptive" PD routing gives pd_split the prompt/output ratio too."""
    pd = PDSeparationConfig(prefill_device_ids=[0], decode_device_ids=[1], prefilling_threshold_ratio=3.0)
    cp = ControlPlaneManager(model=str(tiny_model), pd_config=pd)
    nodes = graph_of(cp).nodes.values()
    devices = {n.op: n.params.get("device_ids") for n in nodes if n.op in ("prefill", "decode")}
    assert devices == {"prefill": [0], "decode": [1]}
    (split,) = [n.params for n in nodes if n.op == "pd_split"]
    assert split == {"threshold_tokens": 800, "ratio": 3.0}
    threshold = ControlPlaneManager(model=str(tiny_model), pd_config=PDSeparationConfig(routing_policy="threshold"))
    assert [n.params for n in graph_of(threshold).nodes.values() if n.op == "pd_split"] == [
        {"threshold_tokens": 800, "ratio": 0.0}
    ]


def graph_of(cp: ControlPlaneManager) -> Any:
    """The graph `cp.start()` would run."""
    return control_plane_graph(cp.model, cp.scheduling_policy, cp.routing_strategy, cp.pd_config,
                               pd_separation=cp.enable_pd_separation, monitoring=cp.enable_monitoring)  # fmt: skip


class ShortestPromptFirst(SchedulingPolicy):
    """A policy of the seed's shape: the shortest prompt next, each sent to the least loaded instance."""

    def prioritize(self, requests):
        return sorted(requests, key=lambda r: len(r.prompt or ""))

    def schedule(self, requests, instances):
        target = min(instances, key=lambda i: i.current_load)
        return [SchedulingDecision(r.request_id, target.instance_id, estimated_latency_ms=1.0) for r in requests]


class LongestFirstAsync(SchedulingPolicy):
    """The documents' form: an async schedule of one request."""

    def prioritize(self, requests):
        return sorted(requests, key=lambda r: -len(r.prompt or ""))

    async def schedule(self, request, instances):
        return SchedulingDecision(request.request_id, instances[0].instance_id)


@pytest.mark.parametrize("policy", [ShortestPromptFirst(), LongestFirstAsync()], ids=["sync", "async"])
def test_a_custom_policy_orders_the_real_queue(policy):
    """The real policy_sort with a SchedulingPolicy object: the waiting requests leave in its order, pinned where
    its decision says."""
    from sagellm.control_plane.policies import policy_name
    from sagellm.operators.policy_sort import PolicySort
    from sagellm.runtime.pipeline.messages import Request
    from sagellm.runtime.pipeline.operator import InstanceStats, OperatorContext

    queue = PolicySort(policy=policy_name(policy))
    queue.open(OperatorContext(node_id="sort", instances={"a": InstanceStats("a"), "b": InstanceStats("b", running=3)}))
    for i, prompt in enumerate(["three words here", "x", "two words"]):
        queue.push(Request(request_id=f"r{i}", prompt=prompt))
    popped = [queue.pop() for _ in range(3)]
    expected = ["r1", "r2", "r0"] if isinstance(policy, ShortestPromptFirst) else ["r0", "r2", "r1"]
    assert [r.request_id for r in popped] == expected and {r.instance for r in popped} == {"a"}
    assert queue.pop() is None


class Broken(SchedulingPolicy):
    def prioritize(self, requests):
        raise RuntimeError("a bug in the policy")

    def schedule(self, requests, instances):
        return [None]  # not a decision


def test_a_policy_that_fails_never_stops_the_queue():
    """A policy's exception is logged and the queue goes on in arrival order, route placing the requests."""
    from sagellm.control_plane.policies import policy_name
    from sagellm.operators.policy_sort import PolicySort
    from sagellm.runtime.pipeline.messages import Request
    from sagellm.runtime.pipeline.operator import OperatorContext

    queue = PolicySort(policy=policy_name(Broken()))
    queue.open(OperatorContext(node_id="sort"))
    for i in range(3):
        queue.push(Request(request_id=f"r{i}", prompt="hi"))
    popped = [queue.pop() for _ in range(3)]
    assert [r.request_id for r in popped] == ["r0", "r1", "r2"] and {r.instance for r in popped} == {None}


@pytest.mark.slow
def test_a_custom_policy_serves_requests_through_the_manager(upstreams):
    """A policy object given to the manager runs its gateway's queue (its decision pins the instance), and the
    seed's class names select sageLLM's own policies."""
    cp = ControlPlaneManager(scheduling_policy=LongestFirstAsync())
    cp.register_instance(instance("a", upstreams[0].url))
    cp.register_instance(instance("b", upstreams[1].url))
    with cp:
        ids = [cp.sync.submit_request(RequestMetadata(prompt="word " * n, max_tokens=2)) for n in (1, 2, 3)]
        results = [cp.sync.wait(request_id) for request_id in ids]
        assert [r.status for r in results] == [RequestStatus.COMPLETED] * 3
        assert {r.instance_id for r in results} == {"a"}  # the decision: the first instance listed
        assert cp.get_status()["scheduling_policy"] == "LongestFirstAsync"
        cp.update_policy(PriorityPolicy())
        assert cp.sync.wait(cp.sync.submit_request(RequestMetadata(prompt="hi", max_tokens=2))).ended
        assert cp.get_status()["scheduling_policy"] == "PriorityPolicy"


@pytest.mark.slow
def test_a_custom_policy_orders_requests_waiting_for_a_busy_instance(upstreams):
    """One instance taking one request at a time, busy with a long one: five requests submitted meanwhile wait in
    the policy queue (none refused) and leave in the custom policy's order (shortest prompt first), but for the two
    already on their way to the instance (one held where the instance's requests start, one in the queue's send)."""
    cp = ControlPlaneManager(scheduling_policy=ShortestPromptFirst())
    cp.register_instance(instance("a", upstreams[0].url, max_concurrent_requests=1))
    with cp:
        long = {"model": "upstream", "prompt": "hi", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
        busy = threading.Thread(target=httpx.post, args=(cp.url + "/v1/completions",), kwargs={"json": long})
        busy.start()
        while not cp.get_instances()[0].active_requests:
            time.sleep(0.001)
        prompts = {f"p{n}": "word " * n for n in (5, 1, 4, 2, 3)}
        for request_id, prompt in prompts.items():
            cp.sync.submit_request(RequestMetadata(request_id, prompt, max_tokens=2, temperature=0))
        finished: list[str] = []
        while len(finished) < len(prompts):
            for request_id in prompts:
                result = cp.sync.get_request_result(request_id)
                if request_id not in finished and result.ended:
                    assert result.status is RequestStatus.COMPLETED, result
                    finished.append(request_id)
            time.sleep(0.002)
        busy.join()
    assert finished[:2] == ["p5", "p1"] and finished[2:] == ["p2", "p3", "p4"]  # submitted p4, p2, p3


@pytest.mark.slow
def test_instances_with_an_engine_kind_are_started_and_supervised_here(tiny_model, tmp_path, monkeypatch):
    """`ExecutionInstance(engine_kind=...)`: the control plane starts the engine's own server (a stand-in `vllm`
    here, found through $SAGELLM_VLLM) or an engine of ours on the weights given, waits for it, routes to it, and
    stops it with the plane."""
    monkeypatch.setenv("SAGELLM_VLLM", str(executable(tmp_path, "vllm", FAKE_VLLM)))
    cp = ControlPlaneManager(enable_pd_separation=False)
    cp.register_instance(ExecutionInstance(
        "ours", model_name=str(tiny_model), engine_kind="llm", decoding_config=DecodingConfig(max_parallel_requests=3)
    ))  # fmt: skip
    cp.register_instance(ExecutionInstance("theirs", model_name="stand-in", engine_kind="vllm", gpu_count=0))
    with cp:
        instances = {i.instance_id: i for i in cp.get_instances()}
        assert instances["ours"].is_healthy and instances["theirs"].is_healthy
        theirs = cp.health_check("theirs")
        assert theirs["state"] == "ready" and instances["theirs"].port != 8000  # where the started server listens
        done = cp.sync.wait(cp.sync.submit_request(
            RequestMetadata(prompt=PROMPT, max_tokens=4, temperature=0, model_name=str(tiny_model))
        ))  # fmt: skip
        assert (done.status, done.instance_id) == (RequestStatus.COMPLETED, "ours")
        per_instance = cp.get_metrics().metadata["instances"]["theirs"]
        assert per_instance["gpus"] == [] and per_instance["gpu_utilization"] is None  # no GPU given: unknown, not 0
        engines = cp._gateway.gateway.engines
        pid = cp._gateway.call(lambda: engines.get("theirs").pid)
        assert cp._gateway.call(lambda: engines.get("ours").spec.engine) == {
            "max_num_seqs": 3,
            "enable_prefix_caching": True,
        }
    assert not alive(pid)
    with pytest.raises(ValueError, match="engine_kind: 'tgi' is not one of llm, vllm"):
        ExecutionInstance("x", model_name="m", engine_kind="tgi")


def test_an_engines_gpu_utilization_is_that_of_the_gpus_it_was_given():
    gpus = gpu_inventory(FakeNvml([FakeGpu(utilization_percent=p) for p in (10, 50, None)])).gpus
    assert gpu_utilization(gpus, [1]) == 50 and gpu_utilization(gpus, [0, 1]) == 30
    assert gpu_utilization(gpus, [2]) is None and gpu_utilization(gpus, []) is None
