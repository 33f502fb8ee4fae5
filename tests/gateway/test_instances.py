"""One registry of instances, one path: two real servers (gateways on the same tiny weights, on 127.0.0.1) attached
to a third as instances of one model name. Their requests go admission -> policy queue -> route -> an instance ->
metrics like the graph's own: route spreads concurrent streams over both, the gateway's metrics count them, greedy
text is the servers' own, a server's refusal reaches the client as its own; a stop drains (the stream in flight
finishes, new requests go to the other instance)."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config
from tests.gateway.test_management import ENGINES, wait_for

CHAT = [{"role": "user", "content": "Name three rivers."}]
GREEDY: dict[str, Any] = dict(messages=CHAT, temperature=0, max_tokens=12, extra_body={"ignore_eos": True})


def attach(admin: httpx.Client, url: str, name: str) -> str:
    body = {"kind": "openai", "model": "upstream", "url": url + "/v1", "served_model_name": name}
    created = admin.post(ENGINES, json=body)
    assert created.status_code == 201, created.text
    assert wait_for(admin, created.json()["id"], {"ready"})["state"] == "ready"
    return created.json()["id"]


def served(upstream: Any) -> int:
    """Requests the server finished."""
    return upstream.core.local.load.completed


def successes(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(v) for v in re.findall(r"^sagellm:request_success_total\{[^}]*\} (\S+)$", text, re.MULTILINE))


def stream_text(client: openai.OpenAI, model: str, **params: Any) -> tuple[str, str | None]:
    chunks = list(client.chat.completions.create(model=model, stream=True, **{**GREEDY, **params}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].choices[0].finish_reason


@pytest.mark.slow
def test_two_servers_of_one_model_share_its_requests_through_the_graph(admin, gateway, tiny_model, tmp_path):
    with (
        running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path / "a", served_model_name="upstream"),
                        tiny_model) as first,
        running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path / "b", served_model_name="upstream"),
                        tiny_model) as second,
    ):  # fmt: skip
        ids = [attach(admin, first.url, "pool"), attach(admin, second.url, "pool")]
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=REPLY_TIMEOUT_S)
        assert [m.id for m in client.models.list().data].count("pool") == 1
        direct = openai.OpenAI(base_url=first.url + "/v1", api_key="unused", max_retries=0)
        expected = direct.chat.completions.create(model="upstream", **GREEDY).choices[0].message.content
        too_long = {"model": "pool", "messages": CHAT, "max_tokens": 1_000_000}  # the server checks its context
        refused = httpx.post(gateway.url + "/v1/chat/completions", json=too_long, timeout=REPLY_TIMEOUT_S)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
        assert "maximum context length" in refused.json()["error"]["message"]
        before = (served(first), served(second), successes(gateway.url))

        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda _: stream_text(client, "pool"), range(6)))
        assert replies == [(expected, "length")] * 6
        assert served(first) > before[0] and served(second) > before[1]  # route spread them
        assert served(first) + served(second) == before[0] + before[1] + 6
        assert successes(gateway.url) == before[2] + 6  # the gateway's own metrics sink counted them

        # A stop drains: the stream in flight on the first server finishes whole; meanwhile and after, the second
        # serves every new request.
        long_done: list[tuple[str, str | None]] = []
        opened = threading.Event()

        def long_stream() -> None:
            stream = client.chat.completions.create(model="pool", stream=True, **{**GREEDY, "max_tokens": 200})
            text = ""
            for chunk in stream:
                opened.set()
                text += chunk.choices[0].delta.content or "" if chunk.choices else ""
                finish = chunk.choices[0].finish_reason if chunk.choices else None
                if finish:
                    long_done.append((text, finish))

        holder = threading.Thread(target=long_stream)
        holder.start()
        assert opened.wait(60)
        holding = ids[0] if first.core.in_flight else ids[1]
        other = second if holding == ids[0] else first
        stopping = threading.Thread(target=lambda: admin.delete(f"{ENGINES}/{holding}"))
        stopping.start()
        assert wait_for(admin, holding, {"draining"}, timeout=30)["state"] == "draining"
        served_before = served(other)
        assert stream_text(client, "pool") == (expected, "length")
        assert served(other) == served_before + 1
        holder.join(REPLY_TIMEOUT_S)
        stopping.join(60)
        assert len(long_done) == 1 and long_done[0][1] == "length"
        assert admin.get(f"{ENGINES}/{holding}").status_code == 404
        assert stream_text(client, "pool") == (expected, "length")


def test_a_model_nothing_serves_is_404_naming_what_is_served(gateway):
    reply = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "nope", "messages": CHAT})
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"
    assert repr(gateway.core.model_name) in reply.json()["error"]["message"]


@pytest.mark.slow
def test_a_health_check_on_demand_marks_a_gone_server_and_route_skips_it(admin, gateway, tiny_model, tmp_path):
    config = tiny_config(tmp_path / "up", served_model_name="upstream")
    with running_gateway(GRAPHS / "colocated.yaml", config, tiny_model) as upstream:
        engine_id = attach(admin, upstream.url, "checked")
        checked = admin.get(f"{ENGINES}/{engine_id}/health").json()
        assert checked["healthy"] is True and checked["state"] == "ready" and checked["latency_ms"] >= 0
    checked = admin.get(f"{ENGINES}/{engine_id}/health").json()  # gone: seen at once, not at the next periodic check
    assert checked == {**checked, "healthy": False, "state": "unhealthy"}
    every = {e["id"]: e for e in admin.get("/v1/management/health").json()["data"]}
    assert every[engine_id]["healthy"] is False and every["engine"]["healthy"] is True  # the graph's own engine
    reply = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "checked", "messages": CHAT}, timeout=60)
    assert reply.status_code == 503 and f"{engine_id} is unhealthy" in reply.json()["error"]["message"]
    assert admin.delete(f"{ENGINES}/{engine_id}").status_code == 200


@pytest.mark.slow
def test_a_forced_stop_cuts_the_streams_on_a_server_at_once(admin, gateway, tiny_model, tmp_path):
    """A chat streaming from the stopped server ends at its next event with `instance_lost` (a chat on another
    model's server is not resumed: no portable way to continue an assistant message), well before its 220 tokens."""
    config = tiny_config(tmp_path / "up", served_model_name="upstream")
    with running_gateway(GRAPHS / "colocated.yaml", config, tiny_model) as upstream:
        engine_id = attach(admin, upstream.url, "cut")
        body = {"model": "cut", "messages": CHAT, "max_tokens": 220, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=REPLY_TIMEOUT_S) as reply:
            for line in reply.iter_lines():
                if not line.startswith("data: "):
                    continue
                if len(events) == 2:
                    assert admin.delete(f"{ENGINES}/{engine_id}", params={"force": "true"}).status_code == 200
                events.append(line)
        errors = [e for e in events if '"error"' in e]
        assert len(errors) == 1 and "instance_lost" in errors[0] and f"instance {engine_id} was stopped" in errors[0]
        assert events[-1] == "data: [DONE]" and sum('"content"' in e for e in events) < 200
