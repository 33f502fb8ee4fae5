"""The gateway through the official `openai` SDK and raw HTTP, on a tiny Llama behind graphs/colocated.yaml: replies
equal the offline API's, streams are framed as OpenAI frames them, and every error has OpenAI's shape and status."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from sagellm import LLM, SamplingParams
from sagellm.gateway.serving.core import metrics_snapshot
from tests.gateway.conftest import (
    GRAPHS,
    REPLY_TIMEOUT_S,
    leave_a_stream_and_see_it_cancelled,
    running_gateway,
    tiny_config,
)

KEY = "sk-test"
OTHER_KEY = "sk-other"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("gw"), api_keys=[KEY, OTHER_KEY], max_body_bytes=64 * 1024)
    with running_gateway(GRAPHS / "colocated.yaml", config, model=tiny_model) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline(tiny_model) -> LLM:
    return LLM(str(tiny_model))


def test_models_lists_the_served_model(client, gateway):
    models = client.models.list().data
    assert [m.id for m in models] == [gateway.core.model_name]


def test_chat_plain_and_streamed_equal_the_offline_api(client, gateway, offline):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = offline.chat(CHAT, params)[0].outputs[0]
    reply = client.chat.completions.create(
        model=gateway.core.model_name, messages=CHAT, temperature=0, max_tokens=12, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens == len(offline.chat(CHAT, params)[0].prompt_token_ids)

    chunks = list(
        client.chat.completions.create(
            messages=CHAT, model=gateway.core.model_name, temperature=0, max_tokens=12, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completions_batch_logprobs_and_max_completion_tokens(client, offline):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = ["Hello there", "One two three"]
    expected = [o.outputs[0].text for o in offline.generate(prompts, params)]
    reply = client.completions.create(
        model=None or client.models.list().data[0].id, prompt=prompts, temperature=0, max_tokens=6, logprobs=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == expected
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert reply.usage.completion_tokens == 12

    chat = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=CHAT, temperature=0, max_completion_tokens=3,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    entries = chat.choices[0].logprobs.content
    assert chat.usage.completion_tokens == len(entries) <= 3 and all(len(e.top_logprobs) == 3 for e in entries)


def test_sse_framing_at_the_http_level(gateway):
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", gateway.url + "/v1/completions", json=body, headers=auth(), timeout=REPLY_TIMEOUT_S
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all(p["object"] == "text_completion" for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_error_statuses_and_shapes(client, gateway):
    model = gateway.core.model_name
    cases = [
        (openai.BadRequestError, dict(temperature=-1), "temperature"),
        (openai.BadRequestError, dict(n=17), "n"),
        (openai.BadRequestError, dict(tool_choice="required"), "tool_choice"),  # no tools to choose from
        (openai.NotFoundError, dict(model="no-such-model"), "model"),
    ]
    for error, extra, param in cases:
        with pytest.raises(error) as raised:
            client.chat.completions.create(**{"model": model, "messages": CHAT, "max_tokens": 2, **extra})
        body = raised.value.body
        assert set(body) == {"message", "type", "param", "code"} and body["param"] == param, body

    too_long = "hello " * 5000  # the tiny model's context is far shorter
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=model, prompt=too_long, max_tokens=2)
    assert raised.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as raised:  # streamed: the status, not a 200 holding an error
        client.completions.create(model=model, prompt=too_long, max_tokens=2, stream=True)
    assert raised.value.body["code"] == "context_length_exceeded"

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(gateway.url + "/v1/models").status_code == 401

    big = httpx.post(gateway.url + "/v1/completions", content=b"x" * (65 * 1024), headers=auth())
    assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"
    bad_json = httpx.post(gateway.url + "/v1/completions", content=b"{not json", headers=auth())
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    for body, words in (
        (b'{"prompt": "\xff"}', "not UTF-8"),
        (b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "too deeply"),
    ):
        odd = httpx.post(gateway.url + "/v1/completions", content=body, headers=auth())
        assert odd.status_code == 400 and words in odd.json()["error"]["message"], odd.text
    wrong_type = httpx.post(gateway.url + "/v1/completions", json={"prompt": "x", "max_tokens": "many"}, headers=auth())
    assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"] == "max_tokens"


# Values a shallow check lets through and shared code fails on (msgpack encoding, the engine's batch): each is a 400
# naming its field, and the gateway serves on.
HUGE = 10**30
BAD_BODIES = [
    ({"messages": CHAT, "priority": HUGE}, {}, "priority"),
    ({"messages": CHAT}, {"X-Request-Priority": str(HUGE)}, "priority"),
    ({"messages": CHAT, "top_k": HUGE}, {}, "top_k"),
    ({"messages": CHAT, "stop_token_ids": [HUGE]}, {}, "stop_token_ids[0]"),
    ({"messages": CHAT, "max_tokens": HUGE}, {}, "max_tokens"),
    ({"prompt": [[1.5, 2.0]]}, {}, "prompt"),
    ({"prompt": [["a"]]}, {}, "prompt"),
    ({"prompt": [True, 2]}, {}, "prompt"),
    ({"prompt": [HUGE]}, {}, "prompt"),
    ({"messages": [{"role": "hacker", "content": "hi"}]}, {}, "messages[0].role"),
]


@pytest.mark.parametrize(("body", "headers", "param"), BAD_BODIES)
def test_out_of_range_and_mistyped_values_are_400_naming_the_field(gateway, body, headers, param):
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    reply = httpx.post(gateway.url + route, json={"max_tokens": 2, **body}, headers={**auth(), **headers})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param, reply.text
    fine = httpx.post(gateway.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=auth())
    assert fine.status_code == 200


def test_long_prompts_are_tokenized_off_the_event_loop_and_overlong_ones_refused_untokenized(gateway, monkeypatch):
    import threading

    import sagellm.gateway.serving.prompts as core

    threads, real = [], core.tokenize_request

    def recording(*args):
        threads.append(threading.current_thread())
        return real(*args)

    body = {"prompt": "the quick brown fox jumps over the lazy dog", "max_tokens": 3, "temperature": 0}
    inline = httpx.post(gateway.url + "/v1/completions", json=body, headers=auth()).json()
    monkeypatch.setattr(core, "OFF_LOOP_CHARS", 10)  # this prompt now counts as long
    monkeypatch.setattr(core, "tokenize_request", recording)
    threaded = httpx.post(gateway.url + "/v1/completions", json=body, headers=auth()).json()
    assert threads and all(t is not gateway.thread for t in threads)  # a worker thread, not the gateway's loop
    assert threaded["choices"][0]["text"] == inline["choices"][0]["text"]
    assert threaded["usage"]["prompt_tokens"] == inline["usage"]["prompt_tokens"]  # (the second hits the prefix cache)

    monkeypatch.setattr(core, "OFF_LOOP_CHARS", 4096)
    threads.clear()
    huge = {"prompt": "x" * 60_000, "max_tokens": 2}  # 60,000 characters cannot fit 256 tokens
    reply = httpx.post(gateway.url + "/v1/completions", json=huge, headers=auth())
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"
    assert "characters" in reply.json()["error"]["message"] and threads == []  # refused without tokenizing


def test_sessions_belong_to_their_key_and_a_long_history_is_completed_over_its_latest_turns(gateway):
    created = httpx.post(gateway.url + "/sessions", json={"title": "mine"}, headers=auth())
    sid = created.json()["id"]
    assert created.status_code == 201 and "owner" not in created.json()
    mine = httpx.get(gateway.url + "/sessions", headers=auth()).json()["data"]
    theirs = httpx.get(gateway.url + "/sessions", headers=auth(OTHER_KEY)).json()["data"]
    assert sid in [s["id"] for s in mine] and sid not in [s["id"] for s in theirs]
    assert httpx.get(f"{gateway.url}/sessions/{sid}", headers=auth(OTHER_KEY)).status_code == 404
    assert httpx.delete(f"{gateway.url}/sessions/{sid}", headers=auth(OTHER_KEY)).status_code == 404

    long = {"role": "user", "content": "x" * 300}  # alone over the tiny model's 256-token context
    httpx.post(f"{gateway.url}/sessions/{sid}/messages", json={"messages": [long]}, headers=auth())
    turn = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    reply = httpx.post(f"{gateway.url}/sessions/{sid}/chat", json=turn, headers=auth(), timeout=REPLY_TIMEOUT_S)
    assert reply.status_code == 200, reply.text  # completed over the latest turn; the long one stays in the session
    history = httpx.get(f"{gateway.url}/sessions/{sid}", headers=auth()).json()["messages"]
    assert [m["role"] for m in history] == ["user", "user", "assistant"] and history[0]["content"] == long["content"]


def test_no_healthy_instance_is_503_and_recovers(client, gateway):
    engine = gateway.core.registry.instances()["engine"]
    gateway.call(setattr, engine, "healthy", False)
    try:
        with pytest.raises(openai.InternalServerError) as raised:
            client.chat.completions.create(model=gateway.core.model_name, messages=CHAT, max_tokens=2)
        assert raised.value.status_code == 503 and raised.value.response.headers["retry-after"]
        for probe in ("/health", "/ready"):
            reply = httpx.get(gateway.url + probe)
            assert reply.status_code == 503 and reply.json()["status"] == "unavailable"
    finally:
        gateway.call(setattr, engine, "healthy", True)
    assert client.chat.completions.create(model=gateway.core.model_name, messages=CHAT, max_tokens=2).choices


def test_a_failure_mid_stream_ends_the_stream_with_an_error_event(gateway):
    (engine,) = gateway.core.nodes_of("engine").values()
    real_step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected engine failure")
        return real_step()

    gateway.call(setattr, engine, "step", failing_step)
    try:
        body = {"prompt": "Hello", "max_tokens": 20, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream(
            "POST", gateway.url + "/v1/completions", json=body, headers=auth(), timeout=REPLY_TIMEOUT_S
        ) as response:
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    finally:
        gateway.call(delattr, engine, "step")
    assert response.status_code == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "internal" and "injected engine failure" in error["message"]
    assert all("choices" in json.loads(e) for e in events[:-2])  # the failure is not assistant text


def test_a_client_that_leaves_cancels_its_request(gateway):
    leave_a_stream_and_see_it_cancelled(gateway, auth())
    snapshot = gateway.call(metrics_snapshot, gateway.core)
    assert snapshot.active == 0


def _aborted(gateway) -> float:
    """Requests ended by their client leaving, from the gateway's Prometheus series."""
    text = httpx.get(gateway.url + "/metrics").text
    line = next(
        (ln for ln in text.splitlines() if ln.startswith('sagellm:request_success_total{finished_reason="abort"}')), ""
    )
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def test_a_client_that_gives_up_on_a_plain_request_cancels_it_too(gateway):
    """Not streamed: the client times out and closes the connection; the request stops instead of running unread."""
    before = _aborted(gateway)
    body = {"prompt": "Hello", "max_tokens": 240, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + "/v1/completions", json=body, headers=auth(), timeout=httpx.Timeout(5, read=0.05))
    (engine,) = gateway.core.nodes_of("engine").values()
    for _ in range(200):
        if not gateway.call(engine.in_flight) and gateway.core.in_flight == 0:
            break
        httpx.get(gateway.url + "/health")
    assert gateway.call(engine.in_flight) == [] and gateway.core.in_flight == 0
    assert _aborted(gateway) == before + 1


def test_health_metrics_openapi_and_admin(gateway):
    health = httpx.get(gateway.url + "/health").json()
    assert health["status"] == "ok" and health["engines"][0]["role"] == "colocated"
    text = httpx.get(gateway.url + "/metrics").text
    for name in (
        "time_to_first_token_seconds",
        "time_per_output_token_seconds",
        "e2e_request_latency_seconds",
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prefix_cache_hits",
        "engine_threads",
    ):
        assert f"sagellm:{name}" in text, name  # fmt: skip
    spec = httpx.get(gateway.url + "/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"] and "ChatCompletionRequest" in spec["components"]["schemas"]
    (session_id,) = spec["paths"]["/sessions/{session_id}"]["get"]["parameters"]
    assert session_id == {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}
    wrong_method = httpx.put(gateway.url + "/v1/models", headers=auth())
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "GET"

    admin = {"Authorization": f"Bearer {gateway.gateway.admin_key}"}
    assert httpx.post(gateway.url + "/admin/set_policy", json={"policy": "priority"}).status_code == 401
    assert httpx.post(gateway.url + "/admin/set_policy", json={"policy": "priority"}, headers=auth()).status_code == 401
    switched = httpx.post(gateway.url + "/admin/set_policy", json={"policy": "priority"}, headers=admin)
    assert switched.status_code == 200 and switched.json()["nodes"] == ["sort"]
    assert list(gateway.core.nodes_of("policy_sort").values())[0].policy_name == "priority"
    bad = httpx.post(gateway.url + "/admin/set_policy", json={"policy": "nope"}, headers=admin)
    assert bad.status_code == 400 and "fifo" in bad.json()["error"]["message"]
    metrics = httpx.get(gateway.url + "/admin/metrics", headers=admin).json()
    assert metrics["completed"] >= 1 and "ttft" in metrics


@pytest.mark.slow
def test_the_pd_graph_serves_the_same_replies(tiny_model, tmp_path, offline):
    """graphs/pd.yaml behind the gateway: prefill and decode in two worker processes, the KV moved over ZeroMQ."""
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = offline.chat(CHAT, params)[0].outputs[0].text
    with running_gateway(GRAPHS / "pd.yaml", tiny_config(tmp_path), model=tiny_model) as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
        body = dict(
            model=gw.core.model_name, messages=CHAT, temperature=0, max_tokens=10, extra_body={"ignore_eos": True}
        )
        assert client.chat.completions.create(**body).choices[0].message.content == expected
        chunks = client.chat.completions.create(**body, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        roles = {s.role: s.healthy for s in gw.core.registry.instances().values()}
        assert roles == {"prefill": True, "decode": True}


def test_return_token_ids_gives_each_choice_and_each_chunk_its_output_token_ids(gateway):
    """vLLM's `return_token_ids`: what a control plane in front of this server needs to resume a request exactly."""
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    whole = httpx.post(gateway.url + "/v1/chat/completions", json={**chat, "return_token_ids": True}, headers=auth(),
                       timeout=REPLY_TIMEOUT_S).json()  # fmt: skip
    ids = whole["choices"][0]["token_ids"]
    assert len(ids) == whole["usage"]["completion_tokens"] == 6
    streamed: list[int] = []
    body = {**chat, "return_token_ids": True, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, headers=auth(),
                      timeout=REPLY_TIMEOUT_S) as reply:  # fmt: skip
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                streamed += json.loads(line[6:])["choices"][0].get("token_ids", [])
    assert streamed == ids
    plain = httpx.post(gateway.url + "/v1/chat/completions", json=chat, headers=auth(), timeout=REPLY_TIMEOUT_S).json()
    assert "token_ids" not in plain["choices"][0]  # only when asked
