"""API servers on other hosts (`sagellm serve --api-hub HOST:PORT`, `sagellm api-server --core tcp://...`), as
processes on 127.0.0.1 over a real CURVE-encrypted tcp link:
- a gateway that answers HTTP itself takes an API server started by hand with the command it prints: replies equal
  the offline API's through it, the gateway's API keys hold there, the routes it passes on answer from the core (the
  metrics count its requests), and a client that leaves cancels its request in the core;
- a process without the run's key (another key, or none) gets no answer;
- a core that falls silent (SIGSTOP) ends the API server's requests in flight with an error and answers new ones with
  a 503, never a hang; once the core runs again the API server attaches again and serves."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from types import SimpleNamespace

import httpx
import pytest
import trio
import zmq

from sagellm import LLM, SamplingParams
from sagellm.gateway.api_servers.link import API_SERVER
from sagellm.runtime.comm import wire
from sagellm.runtime.comm.curve import RunKeys
from sagellm.runtime.comm.zmq_trio import connect_dealer
from tests.cli.test_cli import SAGELLM
from tests.cli.test_gateway_cli import free_port
from tests.gateway.conftest import (
    GRAPHS,
    REPLY_TIMEOUT_S,
    leave_a_stream_and_see_it_cancelled,
    running_gateway,
    tiny_config,
)
from tests.gateway.test_api_servers import CHAT
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow
KEY = "sk-remote"
START_S = 120.0


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("core"), api_keys=[KEY], api_hub="127.0.0.1:0")
    with running_gateway(GRAPHS / "colocated.yaml", config, model=tiny_model) as gw:
        yield gw


def start_api_server(core: str, key_file: str, home) -> tuple[subprocess.Popen, str]:
    """`sagellm api-server` in a subprocess on a free port, and its URL once it answers."""
    port = free_port()
    command = [SAGELLM, "api-server", "--core", core, "--key-file", key_file, "--port", str(port)]
    env = {**os.environ, "SAGELLM_HOME": str(home), "SAGELLM_LOG_LEVEL": "warning"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise AssertionError(f"the API server did not answer: {process.stderr.read() if process.stderr else ''}")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_an_api_server_started_by_hand_serves_as_the_gateway_does(gateway, tiny_model, tmp_path):
    hub = gateway.gateway.hub
    assert hub is not None and hub.key_file is not None and hub.endpoint.startswith("tcp://127.0.0.1:")
    api_server, url = start_api_server(hub.endpoint, str(hub.key_file), tmp_path)
    try:
        expected = LLM(str(tiny_model)).chat(CHAT, SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].text
        headers = {"authorization": f"Bearer {KEY}"}
        body = {"model": gateway.core.model_name, "messages": CHAT, "max_tokens": 12, "temperature": 0}
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=REPLY_TIMEOUT_S).status_code == 401
        before = metric(gateway.url, headers)
        plain = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=REPLY_TIMEOUT_S)
        assert plain.status_code == 200 and plain.json()["choices"][0]["message"]["content"] == expected
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                          timeout=REPLY_TIMEOUT_S) as streamed:  # fmt: skip
            events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == expected
        models = httpx.get(url + "/v1/models", headers=headers).json()  # passed on: the core's answer
        assert [m["id"] for m in models["data"]][:1] == [gateway.core.model_name]
        assert metric(url, headers) == metric(gateway.url, headers) == before + 2  # passed on: the core's metrics
        assert httpx.get(url + "/v1/nowhere", headers=headers).status_code == 404
        remote = SimpleNamespace(url=url, core=gateway.core, call=gateway.call)
        leave_a_stream_and_see_it_cancelled(remote, headers)  # type: ignore[arg-type]
    finally:
        stop(api_server)


def metric(url: str, headers: dict[str, str]) -> float:
    text = httpx.get(url + "/metrics", headers=headers).text
    found = re.findall(r"^sagellm:request_success_total\{[^}]*\} (\S+)$", text, re.MULTILINE)
    return sum(float(n) for n in found)


@pytest.mark.parametrize("keys", [RunKeys.generate(), None], ids=["another key", "no key"])
def test_a_process_without_the_runs_key_gets_no_answer(gateway, keys):
    async def attach() -> bool:
        zctx = zmq.Context()
        try:
            with connect_dealer(zctx, gateway.gateway.hub.endpoint, keys=keys) as socket:
                hello = wire.Hello(node=API_SERVER, pid=os.getpid(), host="here", protocol=wire.PROTOCOL)
                await socket.send_frames(wire.encode(hello))
                with trio.move_on_after(3):
                    await socket.receive_frames()
                    return True
                return False
        finally:
            zctx.destroy(linger=0)

    assert trio.run(attach) is False


def test_an_api_server_of_another_wire_protocol_is_refused_with_the_reason(gateway):
    """The link is the pipeline's wire: an API server of another sageLLM version says so in its Hello and is told why
    it is refused (the process then exits with that line), instead of exchanging messages it would misread."""
    hub = gateway.gateway.hub

    async def hello() -> object:
        zctx = zmq.Context()
        try:
            with connect_dealer(zctx, hub.endpoint, keys=RunKeys.read(hub.key_file)) as socket:
                old = wire.Hello(node=API_SERVER, pid=os.getpid(), host="here", protocol=wire.PROTOCOL - 1)
                await socket.send_frames(wire.encode(old))
                with trio.fail_after(10):
                    return wire.decode(await socket.receive_frames())
        finally:
            zctx.destroy(linger=0)

    answer = trio.run(hello)
    assert isinstance(answer, wire.Assign) and f"wire protocol {wire.PROTOCOL - 1}" in answer.error
    assert os.getpid() not in hub.pids.values()  # not attached


def test_a_silent_core_ends_requests_with_an_error_and_its_api_server_serves_again_once_it_is_back(tmp_path):
    home, model = tmp_path / "home", make_tiny_llama(tmp_path / "llama", max_position_embeddings=4096)
    command = [SAGELLM, "serve", str(model), "--port", str(free_port()), "--api-hub", "127.0.0.1:0",
               "--no-embedding"]  # fmt: skip
    env = {**os.environ, "SAGELLM_HOME": str(home), "SAGELLM_LOG_LEVEL": "warning"}
    core = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    api_server = None
    try:
        printed = wait_for_line(core, "sagellm api-server ")
        found = re.search(r"--core (\S+) --key-file (\S+)", printed)
        assert found, printed
        api_server, url = start_api_server(found[1], found[2], home)
        body = {"prompt": "Hello", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                          timeout=REPLY_TIMEOUT_S) as streamed:  # fmt: skip
            lines = streamed.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(core.pid, signal.SIGSTOP)
            started = time.monotonic()
            rest = [line for line in lines if line.startswith("data: ")]
        try:
            assert rest[-1] == "data: [DONE]" and "unavailable" in rest[-2], rest[-3:]
            assert time.monotonic() - started < 25  # the core's silence was noticed, not waited out
            refused = httpx.post(url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
            assert httpx.get(url + "/v1/models", timeout=REPLY_TIMEOUT_S).status_code == 503
        finally:
            os.kill(core.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            reply = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 4}, timeout=REPLY_TIMEOUT_S)
            if reply.status_code == 200:
                break
            time.sleep(0.5)
        assert reply.status_code == 200, reply.text
    finally:
        if api_server is not None:
            stop(api_server)
        core.send_signal(signal.SIGTERM)
        try:
            core.wait(60)
        finally:
            if core.poll() is None:
                core.kill()


def wait_for_line(process: subprocess.Popen, text: str) -> str:
    """The first line of `process`'s stderr holding `text` (reading stops there)."""
    assert process.stderr is not None
    deadline = time.monotonic() + START_S
    for line in process.stderr:
        if text in line:
            return line
        assert time.monotonic() < deadline, "not printed in time"
    raise AssertionError(f"the process ended (exit {process.wait()}) before printing {text!r}")
