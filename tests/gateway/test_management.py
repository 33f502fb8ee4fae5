"""The management API on a real gateway (a tiny Llama behind graphs/colocated.yaml): the admin key, every error
status, the device (CPU, NUMA nodes, GPU) and backend inventories, and an `openai` engine (a second real gateway)
that serves its model as an instance of the first one's registry, plain, streamed and failing, until it is stopped
or goes down; spawned `embedding` and `llm` engines (one that serves, one that cannot start and is failed with its
own error message)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from sagellm.backends import list_backends
from sagellm.gateway.control.engine_link import worker_graph
from sagellm.gateway.control.engine_spec import EngineSpec, ManagedEngine
from sagellm.runtime.embedding import EmbeddingEngine
from sagellm.runtime.pipeline.yaml_io import dump_pipeline, load_pipeline
from tests.embedding.conftest import make_tiny_bert, write_sentence_transformers_files
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config

ENGINES = "/v1/management/engines"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def wait_for(admin: httpx.Client, engine_id: str, states: set[str], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        engine = admin.get(f"{ENGINES}/{engine_id}").json()
        if engine["state"] in states or time.monotonic() > deadline:
            return engine
        time.sleep(0.1)


def test_management_needs_the_admin_key(gateway):
    for path in (ENGINES, "/v1/management/gpu", "/v1/management/backends"):
        assert httpx.get(gateway.url + path).status_code == 401
        reply = httpx.get(gateway.url + path, headers={"authorization": "Bearer wrong"})
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(gateway.url + ENGINES, json={"model": "x"}).status_code == 401


def test_graph_engines_are_listed_but_not_stoppable(admin, gateway):
    engines = admin.get(ENGINES).json()["data"]
    graph = [e for e in engines if e["kind"] == "graph"]
    assert [e["id"] for e in graph] == list(gateway.core.registry.instances())
    assert graph[0]["state"] == "ready" and graph[0]["model"] == gateway.core.model_name
    reply = admin.delete(f"{ENGINES}/{graph[0]['id']}")
    assert reply.status_code == 409 and reply.json()["error"]["code"] == "conflict"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"kind": "llm"}, None, "missing required field `model`"),
        ({"model": "m\u0000x"}, "model", "model must be a non-empty name without NUL characters"),
        ({"model": " "}, "model", "model must be a non-empty name"),
        ({"model": "m", "served_model_name": ""}, "served_model_name", "served_model_name must be a non-empty name"),
        ({"model": "m", "replicas": 2}, "replicas", "unknown field `replicas`"),
        ({"model": "m", "tensor_parallel": "two"}, "tensor_parallel", "Expected `int`"),
        ({"model": "m", "tensor_parallel": 0}, "tensor_parallel", "tensor_parallel must be >= 1"),
        (
            {"model": "m", "tensor_parallel": 2, "use_gpu": True},
            "tensor_parallel",
            "tensor_parallel=2 needs 2 GPU(s); found none (no NVIDIA GPU found (NVML:",
        ),
        ({"model": "m", "engine": {"max_num_seqs": 0}}, "engine.max_num_seqs", "max_num_seqs must be >= 1"),
        ({"model": "m", "engine": {"max_num_seqs": "8"}}, "engine.max_num_seqs", "max_num_seqs must be int"),
        ({"model": "m", "engine": {"batch": 8}}, "engine.batch", "unknown engine setting 'batch'"),
        ({"model": "m", "kind": "embedding", "engine": {"max_num_seqs": 8}}, "engine", "for llm engines"),
        ({"model": "m", "use_gpu": True}, "use_gpu", "use_gpu needs 1 GPU(s); found none"),
        ({"model": "m", "kind": "openai"}, "url", "an openai engine needs `url`"),
        ({"model": "m", "url": "http://127.0.0.1:1"}, "url", "url and api_key are for openai engines"),
        ({"model": "m", "max_concurrent": 0}, "max_concurrent", "max_concurrent must be >= 1"),
        ({"model": "m", "port": 9000}, "port", "unknown field `port`"),  # an engine of ours listens on no port
        ({"model": "m", "placement": "remote:a"}, "placement", "placement must be 'ray:GROUP' or left out"),
        ({"model": "m", "placement": "ray:a"}, "placement", "placement ray:a needs a Ray cluster"),
        ({"model": "m", "kind": "openai", "url": "http://h", "placement": "ray:a"}, "kind", "placement are an openai"),
    ],
)
def test_bad_start_bodies_are_400(admin, body, param, words):
    reply = admin.post(ENGINES, json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"


def test_empty_or_malformed_body_is_400(admin):
    assert admin.post(ENGINES, content=b"").status_code == 400
    assert admin.post(ENGINES, content=b"{not json").status_code == 400


def test_unknown_engine_is_404(admin):
    for method in ("GET", "DELETE"):
        reply = admin.request(method, f"{ENGINES}/llm-99")
        assert reply.status_code == 404 and "no managed engine 'llm-99'" in reply.json()["error"]["message"]


def test_the_gateways_own_model_name_is_409_for_an_embedding_engine(admin, gateway):
    """(A generation engine of that name is one more instance of the gateway's model: tests/gateway/test_join.py.)"""
    reply = admin.post(ENGINES, json={"model": gateway.core.model_name, "kind": "embedding"})
    assert reply.status_code == 409 and "served_model_name" in reply.json()["error"]["message"]


def test_gpu_route_says_why_there_is_none_and_shows_the_cpu(admin):
    reply = admin.get("/v1/management/gpu").json()
    assert reply["gpus"] == [] and reply["links"] == [] and reply["driver_version"] is None
    assert reply["reason"].startswith("no NVIDIA GPU found (NVML: ")
    cpu = reply["cpu"]
    assert cpu["threads"] == os.cpu_count() and cpu["sockets"] >= 1 and cpu["memory_total_mib"] > 0
    assert sorted(c for node in cpu["numa_nodes"] for c in node["cpus"]) == list(range(os.cpu_count()))


def test_backends_route_matches_the_registry(admin):
    data = admin.get("/v1/management/backends").json()["data"]
    assert [(b["name"], b["available"]) for b in data] == [(n, s.available) for n, s in list_backends()]
    assert {b["name"]: b["available"] for b in data}["cpu"] is True


@pytest.mark.slow
def test_openai_engine_serves_its_model_until_it_stops_or_goes_down(admin, gateway, tiny_model, tmp_path):
    """A second gateway serving the same weights as `upstream` is registered as `remote`: requests for `remote`
    reach it through the graph (model renamed on the way), with its replies, stream framing and error statuses."""
    config = tiny_config(tmp_path, served_model_name="upstream")
    with running_gateway(GRAPHS / "colocated.yaml", config, tiny_model) as upstream:
        body = {"model": "upstream", "kind": "openai", "url": upstream.url + "/v1/", "served_model_name": "remote"}
        created = admin.post(ENGINES, json=body | {"label": "peer", "max_concurrent": 1})
        assert created.status_code == 201 and created.json()["state"] == "starting"
        engine = wait_for(admin, created.json()["id"], {"ready"})
        assert engine["state"] == "ready" and engine["url"] == upstream.url and engine["model"] == "remote"

        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        assert "remote" in [m.id for m in client.models.list().data]
        params: dict[str, Any] = dict(messages=CHAT, temperature=0, max_tokens=8, extra_body={"ignore_eos": True})
        direct = openai.OpenAI(base_url=upstream.url + "/v1", api_key="unused", max_retries=0)
        expected = direct.chat.completions.create(model="upstream", **params).choices[0].message.content
        assert client.chat.completions.create(model="remote", **params).choices[0].message.content == expected
        chunks = list(client.chat.completions.create(model="remote", stream=True, **params))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "length"

        stream = _chat("remote", stream=True)
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=stream, timeout=REPLY_TIMEOUT_S) as reply:
            assert reply.headers["content-type"].startswith("text/event-stream")
            events = [line for line in reply.iter_lines() if line]
        assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"

        bad = httpx.post(gateway.url + "/v1/completions", json={"model": "remote", "prompt": "x", "max_tokens": -1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"

        _over_the_limit_waits_its_turn(gateway.url)

    # the upstream has stopped under the gateway: requests for its model are 503s (unreachable or unhealthy)
    down = httpx.post(gateway.url + "/v1/chat/completions", json=_chat("remote"))
    assert down.status_code == 503 and down.json()["error"]["code"] == "unavailable"
    stopped = admin.delete(f"{ENGINES}/{engine['id']}")
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
    assert admin.get(f"{ENGINES}/{engine['id']}").status_code == 404
    gone = httpx.post(gateway.url + "/v1/chat/completions", json=_chat("remote"))
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def _chat(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": CHAT, "max_tokens": 4, **fields}


def _over_the_limit_waits_its_turn(url: str) -> None:
    """With max_concurrent 1, a second request while a long stream is in flight waits in the policy queue for the
    server to have room, then completes (the gateway does not send it over the server's limit)."""
    opened = threading.Event()
    long = _chat("remote", stream=True, max_tokens=200, ignore_eos=True)
    ended: list[bool] = []

    def hold_a_stream() -> None:
        with httpx.stream("POST", url + "/v1/chat/completions", json=long, timeout=60) as reply:
            opened.set()
            for _ in reply.iter_lines():
                pass
        ended.append(True)

    holder = threading.Thread(target=hold_a_stream)
    holder.start()
    assert opened.wait(30)
    second = httpx.post(url + "/v1/chat/completions", json=_chat("remote"), timeout=60)
    holder.join(60)
    assert second.status_code == 200, second.text
    assert ended, "the stream ended too"


@pytest.mark.slow
def test_spawned_engines_serve_or_fail_with_their_error(admin, gateway, tmp_path):
    """Two processes at once: an embedding engine on a tiny sentence-transformers model, whose vectors reach the
    client under the gateway's name for it, and an llm engine on a missing model, failed with its own message."""
    model = write_sentence_transformers_files(make_tiny_bert(tmp_path / "tiny-st"))
    embedding = admin.post(ENGINES, json={"model": str(model), "kind": "embedding", "served_model_name": "vectors"})
    broken = admin.post(ENGINES, json={"model": str(tmp_path / "missing"), "served_model_name": "broken"})
    assert embedding.status_code == broken.status_code == 201

    failed = wait_for(admin, broken.json()["id"], {"failed"})
    assert failed["state"] == "failed" and failed["restarts"] == 0
    assert "missing: no such file or directory" in failed["last_error"]  # read before its worker starts
    reply = httpx.post(gateway.url + "/v1/chat/completions", json=_chat("broken"))
    assert reply.status_code == 503 and "is failed" in reply.json()["error"]["message"]

    ready = wait_for(admin, embedding.json()["id"], {"ready", "failed"})
    assert ready["state"] == "ready", ready["last_error"]
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    served = {m.id for m in client.models.list().data}
    assert "vectors" in served and "broken" not in served  # a failed engine is not offered
    texts = ["hello world", "the quick brown fox"]
    vectors = [d.embedding for d in client.embeddings.create(model="vectors", input=texts).data]
    expected = EmbeddingEngine(model).embed(texts).embeddings
    assert np.allclose(np.asarray(vectors), np.asarray(expected), atol=1e-5)

    for engine in (ready, failed):
        assert admin.delete(f"{ENGINES}/{engine['id']}").json()["state"] == "stopped"


def test_an_engine_gets_its_engine_settings_as_parameters_of_its_worker_graph(tmp_path):
    """The settings of a start body reach the engine node its worker runs with their types (a bool stays a bool,
    None stays None), in the graph its worker is sent as YAML."""
    settings = {"max_num_seqs": 4, "enable_prefix_caching": False, "max_model_len": None, "kv_cache_memory_gb": 0.5}
    spec = EngineSpec(model="m", engine=settings)
    spec.check()
    engine = ManagedEngine("e1", spec, "", None, directory=tmp_path)
    graph = load_pipeline(dump_pipeline(worker_graph(engine, {})))
    assert {k: graph.nodes["e1"].params[k] for k in settings} == settings
    assert graph.nodes["e1"].params["backend"] == "cpu" and graph.nodes["e1"].placement == "process"
