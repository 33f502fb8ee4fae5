"""Models on demand take turns (`sagellm serve --model a=... --model b=... --max-loaded-models 1`, two tiny models):
requests for one model while the other streams wait their turn and are all served once its streams end, none
refused; a client that leaves its wait leaves the line, and a model nobody waits for any more gives up its turn; the
load counter counts loads only; a model whose worker died reads `restarting` at once, never `loaded` with a dead
pid, and serves again once its worker is back."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from sagellm.common.processes import alive
from sagellm.gateway.config import FailoverPolicy, ModelsOnDemand
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow  # engine processes started and stopped

ENGINE = {"max_num_seqs": 8, "kv_cache_memory_gb": 0.05}
STREAMS, STREAM_TOKENS, WAITING = 4, 240, 8


@pytest.fixture(scope="module")
def gateway(tiny_model: Path, tmp_path_factory):
    other = make_tiny_llama(tmp_path_factory.mktemp("other") / "llama", seed=7)
    models = ModelsOnDemand({"a": str(tiny_model), "b": str(other)}, engine=ENGINE, max_loaded=1)
    config = tiny_config(tmp_path_factory.mktemp("turns"), models_on_demand=models,
                         failover=FailoverPolicy(retry_wait_s=120))  # fmt: skip
    with running_gateway(GRAPHS / "control_plane.yaml", config) as gw:
        yield gw


@pytest.fixture(scope="module")
def admin(gateway) -> httpx.Client:
    headers = {"authorization": f"Bearer {gateway.gateway.admin_key}"}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=REPLY_TIMEOUT_S) as client:
        yield client


def _complete(url: str, model: str, timeout_s: float = REPLY_TIMEOUT_S * 3) -> httpx.Response:
    body = {"model": model, "prompt": "Count: one,", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    return httpx.post(url + "/v1/completions", json=body, timeout=timeout_s)


def _details(admin: httpx.Client, name: str) -> dict:
    return next(m for m in admin.get("/v1/management/models").json()["data"] if m["id"] == name)


def _metric_lines(url: str, prefix: str) -> dict[str, float]:
    lines = (line.rpartition(" ") for line in httpx.get(url + "/metrics").text.splitlines() if line.startswith(prefix))
    return {name: float(value) for name, _, value in lines}


def test_requests_for_a_model_wait_their_turn_while_the_other_streams_and_are_all_served(gateway, admin):
    assert _complete(gateway.url, "a").status_code == 200  # a is loaded
    started = [False] * STREAMS

    def stream(index: int) -> tuple[int, float]:
        body = {"model": "a", "prompt": f"Story {index}:", "max_tokens": STREAM_TOKENS, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        tokens = 0
        with httpx.stream("POST", gateway.url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S * 3) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    started[index] = started[index] or bool(chunk["choices"])
                    tokens = chunk["usage"]["completion_tokens"] if chunk.get("usage") else tokens
        return tokens, time.monotonic()

    def waiting() -> tuple[httpx.Response, float]:
        return _complete(gateway.url, "b"), time.monotonic()

    with ThreadPoolExecutor(STREAMS + WAITING) as threads:
        streams = [threads.submit(stream, i) for i in range(STREAMS)]
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while not all(started):
            assert time.monotonic() < deadline, "the streams did not start"
            time.sleep(0.01)
        others = [threads.submit(waiting) for _ in range(WAITING)]
        sent = time.monotonic()
        ends = [s.result() for s in streams]
        replies = [o.result() for o in others]
    assert [tokens for tokens, _ in ends] == [STREAM_TOKENS] * STREAMS  # a's streams ran to their last token
    assert max(at for _, at in ends) > sent  # (b's requests came while a streamed)
    assert [reply.status_code for reply, _ in replies] == [200] * WAITING, [r.text for r, _ in replies]
    assert min(at for _, at in replies) > max(at for _, at in ends)  # b served after a's last token
    assert _details(admin, "b")["status"] == {"value": "loaded"}
    assert _details(admin, "a")["status"] == {"value": "unloaded"}
    loads = _metric_lines(gateway.url, "sagellm:model_loads_total")
    assert loads == {'sagellm:model_loads_total{model="a",outcome="loaded"}': 1.0,
                     'sagellm:model_loads_total{model="b",outcome="loaded"}': 1.0}  # fmt: skip
    assert _metric_lines(gateway.url, 'sagellm:model_load_waits_total{model="b"}') == {
        'sagellm:model_load_waits_total{model="b"}': WAITING
    }
    assert not _metric_lines(gateway.url, "sagellm:model_load_refusals_total")


def test_a_client_that_leaves_its_wait_leaves_the_line_and_its_model_gives_up_its_turn(gateway, admin):
    assert admin.post("/models/unload", json={"model": "b"}).json() == {"success": True}
    while _details(admin, "b")["status"]["value"] != "unloaded":
        time.sleep(0.05)
    with ThreadPoolExecutor(1) as threads:
        first = threads.submit(_complete, gateway.url, "a")  # a loads: seconds (a worker process starts)
        while _details(admin, "a")["status"] != {"value": "loading"}:
            time.sleep(0.01)
        with pytest.raises(httpx.TimeoutException):
            _complete(gateway.url, "b", timeout_s=0.5)  # b waits its turn behind a's load; its client leaves
        deadline = time.monotonic() + 10  # (the gateway sees the connection close)
        while (left := _details(admin, "b"))["waiting"] or left["status"] != {"value": "unloaded"}:
            assert time.monotonic() < deadline, left  # it left the line, and b gave up its turn
            time.sleep(0.02)
        assert first.result().status_code == 200
    assert _details(admin, "a")["status"] == {"value": "loaded"}
    loads = _metric_lines(gateway.url, "sagellm:model_loads_total")
    assert loads['sagellm:model_loads_total{model="b",outcome="loaded"}'] == 1.0  # b was not loaded again


def test_a_request_refused_after_its_model_was_made_ready_holds_it_busy_no_longer(gateway, admin):
    """A request's model is held busy from `model_ready` until the request is submitted (so no load of another
    model evicts it in between): one refused on the way in lets it go at once, not HOLD_S later."""
    assert _complete(gateway.url, "a").status_code == 200  # a serves
    echo = {"model": "a", "prompt": "Hi", "max_tokens": 2, "echo": True}  # echo: the graph's own model only
    assert httpx.post(gateway.url + "/v1/completions", json=echo, timeout=REPLY_TIMEOUT_S).status_code == 400
    budget = {"model": "a", "messages": [{"role": "user", "content": "Hi"}], "thinking_token_budget": 8}
    reply = httpx.post(gateway.url + "/v1/chat/completions", json=budget, timeout=REPLY_TIMEOUT_S)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "thinking_token_budget"
    assert gateway.call(gateway.core.readiness.requests_of, "a") == 0


def test_a_model_whose_worker_died_reads_restarting_at_once_never_loaded_with_a_dead_pid(gateway, admin):
    assert _complete(gateway.url, "a").status_code == 200
    before = _details(admin, "a")
    assert before["status"] == {"value": "loaded"} and alive(before["pid"])
    os.kill(before["pid"], signal.SIGKILL)
    while alive(before["pid"]):  # (gone once it is a zombie: its parent, this process, has not reaped it yet)
        time.sleep(0.001)
    seen, deadline = [], time.monotonic() + REPLY_TIMEOUT_S * 2
    while not seen or seen[-1]["status"] != {"value": "loaded"}:
        assert time.monotonic() < deadline, seen[-3:]
        now = _details(admin, "a")
        assert now["status"]["value"] != "loaded" or now["pid"] not in (None, before["pid"]), now
        assert now["pid"] is None or alive(now["pid"]), now
        seen.append(now)
        time.sleep(0.02)
    assert seen[0]["status"]["value"] == "restarting"  # the first look after the kill already tells
    card = next(c for c in httpx.get(gateway.url + "/v1/models").json()["data"] if c["id"] == "a")
    assert card["status"] == {"value": "loaded"}
    assert _complete(gateway.url, "a").status_code == 200
