"""The Python control-plane API over real servers on 127.0.0.1 (two gateways on the same tiny weights): instances
registered by address, requests submitted with priorities and followed to their end, the same requests' status over
HTTP, metrics, health checks, an instance unregistered while serving; and what it refuses, with the reason."""

from __future__ import annotations

import httpx
import openai
import pytest

from sagellm.control_plane import (
    ControlPlaneManager,
    ExecutionInstance,
    ExecutionInstanceType,
    PDSeparationConfig,
    RequestMetadata,
    RequestPriority,
)
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config

PROMPT = "Tell me about the sea."


@pytest.fixture(scope="module")
def upstreams(tiny_model, tmp_path_factory):
    config = lambda name: tiny_config(tmp_path_factory.mktemp(name), served_model_name="upstream")  # noqa: E731
    with (
        running_gateway(GRAPHS / "colocated.yaml", config("a"), tiny_model) as first,
        running_gateway(GRAPHS / "colocated.yaml", config("b"), tiny_model) as second,
    ):
        yield first, second


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
        assert {h["id"]: h["healthy"] for h in cp.health_check_all()} == {"a": True, "b": True}
        priorities = [RequestPriority.LOW, RequestPriority.CRITICAL, RequestPriority.NORMAL, RequestPriority.HIGH]
        ids = [
            cp.submit_request(RequestMetadata(f"r{i}", PROMPT, priority=p, max_tokens=8))
            for i, p in enumerate(priorities)
        ]
        done = [cp.wait(request_id) for request_id in ids]
        assert [(s.state, s.text, s.finish_reason) for s in done] == [("completed", expected, "length")] * 4
        assert {s.instance_id for s in done} == {"a", "b"}  # round robin over both

        over_http = httpx.get(f"{cp.url}/v1/requests/r1").json()
        assert over_http["status"] == "completed" and over_http["instance"] in ("a", "b")
        body = {"model": "upstream", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "priority": "critical"}
        reply = httpx.post(f"{cp.url}/v1/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["text"] == expected  # the HTTP twin takes the same path
        assert httpx.get(f"{cp.url}/v1/requests/{reply['id']}").json()["status"] == "completed"
        assert httpx.get(f"{cp.url}/v1/requests/nope").status_code == 404

        metrics = cp.get_metrics()
        assert metrics["pipeline"]["completed"] == 5 and metrics["in_flight"] == 0
        assert set(metrics["instances"]) == {"a", "b"}

        cp.unregister_instance("a")
        after = cp.wait(cp.submit_request(RequestMetadata("after", PROMPT, max_tokens=8)))
        assert (after.state, after.instance_id, after.text) == ("completed", "b", expected)
        with pytest.raises(ValueError, match="in use"):
            cp.submit_request(RequestMetadata("after", PROMPT))
        assert cp.get_request_status("unknown") is None


def test_what_the_api_refuses_says_why(upstreams):
    with pytest.raises(ValueError, match="give the model they serve"):
        ControlPlaneManager(enable_pd_separation=True)
    cp = ControlPlaneManager()
    with pytest.raises(ValueError, match="runs whole requests"):
        cp.register_instance(instance("p", upstreams[0].url, instance_type=ExecutionInstanceType.PREFILLING))
    with pytest.raises(RuntimeError, match="call start"):
        cp.get_metrics()


def test_pd_separation_gives_each_role_its_devices(tiny_model):
    """The seeds' per-role device ids land on the prefill and decode nodes as `device_ids` (their cores here)."""
    pd = PDSeparationConfig(prefill_device_ids=[0], decode_device_ids=[1])
    cp = ControlPlaneManager(model=str(tiny_model), enable_pd_separation=True, pd_config=pd)
    devices = {n.op: n.params.get("device_ids") for n in cp._graph().nodes.values() if n.op in ("prefill", "decode")}
    assert devices == {"prefill": [0], "decode": [1]}
