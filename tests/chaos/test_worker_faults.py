"""A pipeline worker killed (SIGKILL) or frozen (SIGSTOP) while 32 streams run through the gateway: no stream hangs,
each ends once (its tokens, or an `instance_lost` error event), `/health` stays up while `/ready` says not to send
traffic, the worker is restarted, and the graph serves the same greedy text as before."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from sagellm.benchmarks.chaos_streams import stream_event
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow  # worker processes, restarted

STREAMS = 32
RESTART = {"backoff_base_s": 0.1, "jitter": 0.0}
RECOVERY_LIMIT_S = 90  # a worker imports torch and loads its model again; a loaded CI machine is slow at that


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("faults") / "llama", max_position_embeddings=4096)


def complete(url: str) -> str:
    body = {"prompt": "hello world", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def stream(url: str, index: int, outcomes: dict[int, list[str]], first_token: threading.Event) -> None:
    """One streamed completion; its outcome: what ended it ("length", or the error's code), once per end seen."""
    body = {"prompt": f"stream {index}", "max_tokens": 500, "ignore_eos": True, "stream": True, "temperature": 0}
    ends = outcomes[index] = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S) as reply:
            if reply.status_code != 200:
                ends.append(json.loads(reply.read())["error"]["code"])
                return
            for line in reply.iter_lines():
                end, token = stream_event(line)
                if token:
                    first_token.set()
                if end is not None:
                    ends.append(end)
    except httpx.HTTPError as error:  # a hang (read timeout) or a dropped connection: never expected
        ends.append(f"transport: {error!r}")


def probe(url: str) -> tuple[int, int, list[str]]:
    health, ready = httpx.get(url + "/health"), httpx.get(url + "/ready")
    return health.status_code, ready.status_code, [engine["state"] for engine in health.json()["engines"]]


# What /health and /ready answer while the worker is restarted: without decode nothing can run a request (not
# ready); without prefill, pd_split keeps requests colocated on the decode worker (degraded, still ready).
WITHOUT_DECODE = (200, 503, ["ready", "recovering"])
WITHOUT_PREFILL = (200, 200, ["recovering", "ready"])


@pytest.mark.parametrize(
    ("group", "fault", "recovering"),
    [
        ("decode", signal.SIGKILL, WITHOUT_DECODE),
        ("prefill", signal.SIGKILL, WITHOUT_PREFILL),
        ("decode", signal.SIGSTOP, WITHOUT_DECODE),
    ],
    ids=["kill-decode", "kill-prefill", "stop-decode"],
)
def test_a_lost_worker_under_32_streams_is_restarted(long_model, tmp_path, group, fault, recovering):
    config = tiny_config(tmp_path)
    with running_gateway(GRAPHS / "pd.yaml", config, model=long_model, attrs={"restart": RESTART}) as gw:
        reference = complete(gw.url)
        executor = gw.core.executor
        pid = executor.pids[group]
        outcomes: dict[int, list[str]] = {}
        first_token = threading.Event()
        threads = [threading.Thread(target=stream, args=(gw.url, i, outcomes, first_token)) for i in range(STREAMS)]
        for thread in threads:
            thread.start()
        assert first_token.wait(REPLY_TIMEOUT_S)
        os.kill(pid, fault)
        lost_at = time.monotonic()
        states = []
        while time.monotonic() - lost_at < RECOVERY_LIMIT_S:
            states.append(probe(gw.url))
            if recovering in states and states[-1] == (200, 200, ["ready", "ready"]):
                break
            time.sleep(0.1)
        recovered_s = time.monotonic() - lost_at
        for thread in threads:
            thread.join(REPLY_TIMEOUT_S)
        assert not any(thread.is_alive() for thread in threads), "a stream hung"

        assert sorted(outcomes) == list(range(STREAMS))
        assert all(len(ends) == 1 for ends in outcomes.values()), outcomes  # exactly one end each
        assert {ends[0] for ends in outcomes.values()} <= {"length", "instance_lost"}, outcomes
        assert recovering in states
        assert all(health == 200 for health, _, _ in states)  # alive while it recovers: no probe should restart it
        assert recovered_s < RECOVERY_LIMIT_S and executor.pids[group] != pid
        assert probe(gw.url) == (200, 200, ["ready", "ready"])
        assert complete(gw.url) == reference
        assert executor.supervisions[group].restarts.total == 1


def test_a_worker_is_given_up_when_its_policy_says_so(long_model, tmp_path):
    config = tiny_config(tmp_path)
    restart = {"restart": {"auto_restart": False}}
    with running_gateway(GRAPHS / "pd.yaml", config, model=long_model, attrs=restart) as gw:
        os.kill(gw.core.executor.pids["decode"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while probe(gw.url)[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert probe(gw.url) == (503, 503, ["ready", "lost"])
        reply = httpx.post(gw.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert reply.status_code == 503


def aborted(url: str) -> float:
    """Requests ended by their client leaving, from the gateway's Prometheus series."""
    prefix = 'sagellm:request_success_total{finished_reason="abort"}'
    line = next((ln for ln in httpx.get(url + "/metrics").text.splitlines() if ln.startswith(prefix)), "")
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def test_a_client_that_leaves_frees_the_engine_in_a_worker(long_model, tmp_path):
    """The gateway tells the workers: the decode worker aborts the request between two steps (its blocks freed)
    instead of running it unread to its last token, streamed or not."""
    with running_gateway(GRAPHS / "pd.yaml", tiny_config(tmp_path), model=long_model) as gw:
        decode = gw.core.local.instances["decode"]
        body = {"prompt": "Hello", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
        with httpx.stream("POST", gw.url + "/v1/completions", json={**body, "stream": True}) as reply:
            next(reply.iter_lines())
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gw.url + "/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.5))
        deadline = time.monotonic() + 20  # 4,000 tokens would take far longer
        while (aborted(gw.url), gw.core.in_flight) != (2, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (aborted(gw.url), gw.core.in_flight) == (2, 0)
        while decode.running and time.monotonic() < deadline:  # from the worker's next heartbeat
            time.sleep(0.05)
        assert decode.running == 0 and decode.healthy
