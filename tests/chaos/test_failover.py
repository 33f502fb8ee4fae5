"""Failover and resume through the gateway, with real processes and servers on 127.0.0.1:
- one of two engine worker processes killed (SIGKILL) during 16 greedy streams: every stream ends once, with
  `length` and exactly the text an uninterrupted run gives (those on the lost worker resumed on the other one from
  their prompt and the tokens so far), and the gateway counts the resumed retries;
- one of two attached servers gone between two health checks: the requests sent to it are tried again on the other
  before any token, and all succeed;
- a request whose instance gives no token in time ends with a `timeout` (HTTP 504) once nothing is left to try."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from sagellm.gateway.config import FailoverPolicy
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config
from tests.gateway.test_instances import attach
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow  # worker processes and servers

STREAMS = 16
TWO_WORKERS = """
name: two_workers
model: {model}
transport: ipc
restart: {{backoff_base_s: 0.1, jitter: 0.0}}
nodes:
  source: {{op: prompt_source}}
  admission: {{op: admission}}
  sort: {{op: policy_sort}}
  route: {{op: route, params: {{strategy: round_robin}}}}
  engine_a: {{op: engine, placement: process}}
  engine_b: {{op: engine, placement: process}}
  metrics: {{op: metrics_sink}}
edges:
  - source -> admission -> sort -> route -> [engine_a, engine_b]
  - engine_a -> metrics
  - engine_b -> metrics
"""


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("failover") / "llama", max_position_embeddings=4096)


def completion(url: str, prompt: str, max_tokens: int) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def stream(url: str, index: int, outcomes: dict[int, list[str]], texts: dict[int, str], first: threading.Event) -> None:
    """One greedy streamed completion: its text, and what ended it ("length" or the error's code) once per end."""
    body = {"prompt": f"stream {index}", "max_tokens": 300, "ignore_eos": True, "stream": True, "temperature": 0}
    ends, texts[index] = outcomes.setdefault(index, []), ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S) as reply:
        if reply.status_code != 200:
            ends.append(json.loads(reply.read())["error"]["code"])
            return
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                ends.append(event["error"]["code"])
                continue
            texts[index] += event["choices"][0]["text"]
            first.set()
            if event["choices"][0]["finish_reason"]:
                ends.append(event["choices"][0]["finish_reason"])


def retries(url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(url + "/metrics").text
    found = re.findall(r'^sagellm:request_retries_total\{code="(\w+)",resumed="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return {(code, resumed): float(count) for code, resumed, count in found}


def test_streams_on_a_killed_worker_resume_on_the_other_with_the_same_text(long_model, tmp_path):
    graph = tmp_path / "two.yaml"
    graph.write_text(TWO_WORKERS.format(model=long_model))
    with running_gateway(graph, tiny_config(tmp_path)) as gw:
        texts: dict[int, str] = {}
        outcomes: dict[int, list[str]] = {}
        first_token = threading.Event()
        threads = [
            threading.Thread(target=stream, args=(gw.url, i, outcomes, texts, first_token)) for i in range(STREAMS)
        ]
        for thread in threads:
            thread.start()
        assert first_token.wait(REPLY_TIMEOUT_S)
        os.kill(gw.core.executor.pids["engine_a"], signal.SIGKILL)
        for thread in threads:
            thread.join(REPLY_TIMEOUT_S)
        assert not any(thread.is_alive() for thread in threads), "a stream hung"
        assert outcomes == {i: ["length"] for i in range(STREAMS)}  # every stream finished, once
        resumed = retries(gw.url).get(("instance_lost", "true"), 0)
        assert resumed >= 1  # round robin put half the streams on the killed worker, mid-stream
        for i in range(STREAMS):  # the reference: each prompt again, uninterrupted
            assert texts[i] == completion(gw.url, f"stream {i}", 300), f"stream {i} differs after its resume"


def test_requests_for_a_server_gone_between_health_checks_go_to_the_other(long_model, tmp_path):
    with (
        running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path / "front"), long_model) as gw,
        running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path / "a", served_model_name="upstream"),
                        long_model) as first,
        running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path / "b", served_model_name="upstream"),
                        long_model) as second,
    ):  # fmt: skip
        headers = {"authorization": f"Bearer {gw.gateway.admin_key}"}
        with httpx.Client(base_url=gw.url, headers=headers, timeout=60) as admin:
            attach(admin, first.url, "pool")
            attach(admin, second.url, "pool")
        first.stop()  # gone; the gateway's next health check is seconds away
        body = {"model": "pool", "prompt": "hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: httpx.post(gw.url + "/v1/completions", json=body, timeout=60), range(8)))
        assert [r.status_code for r in replies] == [200] * 8
        assert len({r.json()["choices"][0]["text"] for r in replies}) == 1
        assert retries(gw.url).get(("unavailable", "false"), 0) >= 1


def test_no_token_in_time_is_a_504_timeout(long_model, tmp_path):
    failover = FailoverPolicy(max_retries=1, retry_wait_s=1, token_timeout_s=0.001)  # no engine keeps up with that
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path, failover=failover), long_model) as gw:
        body = {"prompt": "hello", "max_tokens": 400, "ignore_eos": True}
        reply = httpx.post(gw.url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S)
        assert reply.status_code == 504 and reply.json()["error"]["code"] == "timeout"
        assert "within 0.001 s" in reply.json()["error"]["message"]
        too_short = httpx.post(gw.url + "/v1/completions", json={**body, "token_timeout": 0.5}, timeout=REPLY_TIMEOUT_S)
        assert too_short.status_code == 400 and too_short.json()["error"]["param"] == "token_timeout"
        assert retries(gw.url) == {("timeout", "true"): 1}
        own = {**body, "max_tokens": 4, "token_timeout": 30}  # a request's own timeout replaces the gateway's
        assert httpx.post(gw.url + "/v1/completions", json=own, timeout=60).status_code == 200
        deadline = time.monotonic() + 10  # an abandoned attempt ends as its cancellation reaches the engine
        while gw.core.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gw.core.in_flight == 0  # the abandoned attempts left nothing behind
