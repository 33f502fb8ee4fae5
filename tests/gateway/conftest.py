"""A real gateway for the tests: `sagellm.gateway.server.serve` on 127.0.0.1 (a free port) in a thread with its own
trio loop (`GatewayThread`), so synchronous clients (the official `openai` SDK, httpx) talk to it over real sockets
as users do."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from sagellm.gateway.config import GatewayConfig, KVTransferSettings
from sagellm.gateway.server import GatewayThread
from sagellm.runtime.pipeline.yaml_io import load_pipeline
from tests.tiny_models import make_tiny_llama

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
# For raw HTTP requests that wait on the model, in place of httpx's default of 5 s between bytes: a loaded machine
# can spend that on real work (an engine failure's error event waits ~0.7 s here while its traceback is logged).
# Only a hang should reach it.
REPLY_TIMEOUT_S = 60


@contextmanager
def running_gateway(
    graph: str | Path,
    config: GatewayConfig,
    model: Path | None = None,
    attrs: dict[str, Any] | None = None,
    api_servers: int = 0,
    **overrides: Any,
) -> Iterator[GatewayThread]:
    """`attrs`: graph settings to set (`{"restart": {...}}`); `api_servers`: API server processes in front;
    `overrides`: `{"node.param": value}` as `--set` takes them."""
    pipeline = load_pipeline(graph, overrides=overrides or None)
    pipeline.attrs.update(attrs or {})
    if model is not None:
        pipeline.attrs["model"] = str(model)
    running = GatewayThread(pipeline, config, api_servers=api_servers)
    try:
        yield running
    finally:
        running.stop()
        assert not running.thread.is_alive(), "the gateway did not stop"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("gateway") / "tiny-llama")


@pytest.fixture(scope="module")
def upstreams(tiny_model, tmp_path_factory):
    """Two gateways on the tiny weights, both serving them as "upstream": servers a module attaches by address. For
    PD across servers the first prefills for decode servers elsewhere, and the second decodes from the first."""
    with (
        running_upstream(tiny_model, tmp_path_factory.mktemp("a"), PRODUCER) as first,
        running_upstream(tiny_model, tmp_path_factory.mktemp("b"), decoding_from(first)) as second,
    ):
        yield first, second


PRODUCER = KVTransferSettings("producer")  # `sagellm serve --kv-transfer-role producer`


def decoding_from(*prefill_servers: GatewayThread) -> KVTransferSettings:
    """`--kv-transfer-role consumer --kv-transfer-peers HOST:PORT,...`: decodes from these prefill servers."""
    return KVTransferSettings("consumer", tuple(server.url.removeprefix("http://") for server in prefill_servers))


def running_upstream(
    model: Path, tmp_path: Path, kv_transfer: KVTransferSettings | None = None
) -> AbstractContextManager[GatewayThread]:
    """A gateway on `model` served as "upstream", with its part in PD across servers (None: none)."""
    config = tiny_config(tmp_path, served_model_name="upstream", kv_transfer=kv_transfer)
    return running_gateway(GRAPHS / "colocated.yaml", config, model)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_config(tmp_path: Path, **fields: Any) -> GatewayConfig:
    return GatewayConfig(host="127.0.0.1", port=0, state_dir=tmp_path / "state", **fields)


SMOLLM2_ENGINES = {"colocated": ("engine",), "pd": ("prefill", "decode")}


@pytest.fixture(scope="package", params=list(SMOLLM2_ENGINES))
def server(request, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2 served colocated, then through the PD graph (small KV caches), shared by the modules that try what
    programs ask of the server on both graphs; `server.graph` says which."""
    small = {"kv_cache_memory_gb": 0.1, "max_num_seqs": 8}
    overrides = {f"{node}.{name}": value for node in SMOLLM2_ENGINES[request.param] for name, value in small.items()}
    config = tiny_config(tmp_path_factory.mktemp(request.param))
    with running_gateway(GRAPHS / f"{request.param}.yaml", config, smollm2_dir, **overrides) as gw:
        gw.graph = request.param
        yield gw


def sdk_client(gateway: GatewayThread) -> openai.OpenAI:
    """The official openai SDK against `gateway`, as a program would use it (no retries: every answer counts)."""
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=300)


# The servers tests attach by address run here: a gateway that attaches them allows it (`--allowed-upstream`).
LOCAL_UPSTREAMS = ["127.0.0.1"]


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("main"), allowed_upstreams=LOCAL_UPSTREAMS)
    with running_gateway(GRAPHS / "colocated.yaml", config, tiny_model) as gw:
        yield gw


@pytest.fixture(scope="module")
def admin(gateway) -> httpx.Client:
    headers = {"authorization": f"Bearer {gateway.gateway.admin_key}"}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=60) as client:
        yield client


def leave_a_stream_and_see_it_cancelled(gateway: GatewayThread, headers: dict[str, str]) -> None:
    """Starts a long streamed completion, leaves after its first line, and checks that the engine and the core hold
    nothing afterwards: the client's leaving reached the engine."""
    body = {"prompt": "Hello", "max_tokens": 240, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", gateway.url + "/v1/completions", json=body, headers=headers, timeout=REPLY_TIMEOUT_S
    ) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    (engine,) = gateway.core.nodes_of("engine").values()
    deadline = time.monotonic() + 30
    while (gateway.call(engine.in_flight) or gateway.core.in_flight) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gateway.call(engine.in_flight) == [] and gateway.core.in_flight == 0


def assert_refused_chat(gateway: GatewayThread, body: dict[str, Any], param: str, words: str) -> None:
    """A chat with `body`'s fields is a 400 naming `param`, its message holding `words`. The front end checks it
    the same way whatever graph serves, so it is tried on the colocated one only."""
    if getattr(gateway, "graph", "colocated") != "colocated":
        pytest.skip("the front end's check is the same on every graph")
    reply = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body},
        timeout=60,
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"], error
