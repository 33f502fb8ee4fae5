"""Request traces exported with OTLP over HTTP (`--otlp-traces-endpoint`) to a real OTLP/HTTP endpoint in the test
process (`sagellm.benchmarks.otlp_sink`, OpenTelemetry's protobuf types): one streamed request through
graphs/pd.yaml is one trace under the client's `traceparent`, its spans recorded by the processes that did the work
(the gateway: the request, admission, the policy queue, pd_split, route; the prefill worker: prefill and its chunk;
the decode worker: the KV transfer, decode and its steps); a request without a `traceparent` starts a trace of its
own, one marked not sampled is not traced; the access log (`--access-log`) has a line for each, naming its trace, and
one for a refusal, rotated by size; an API server's span sits between the client's and the core's, and a prompt
longer than a step's budget shows each chunk; a call to another server the gateway attached hands that server its
span as the `traceparent`; and a stream resumed after its worker was killed shows its resume as a span of the other
worker."""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time

import httpx
import pytest

from sagellm.benchmarks.otlp_sink import OtlpReceiver
from sagellm.common import tracing
from tests.chaos.test_failover import TWO_WORKERS, wait_for_streams_midway
from tests.gateway.conftest import (
    GRAPHS,
    LOCAL_UPSTREAMS,
    REPLY_TIMEOUT_S,
    running_gateway,
    running_upstream,
    tiny_config,
)

pytestmark = pytest.mark.slow

PD_SPANS = ["sagellm.request", "admission", "policy_queue", "pd_split", "route", "prefill", "kv_transfer", "decode"]
STEPS = ["prefill_chunk", "decode_steps"]  # an engine's steps of a request: children of its engine span


@pytest.fixture
def receiver():
    with OtlpReceiver() as receiver:
        try:
            yield receiver
        finally:
            tracing.shutdown()  # this process's exporter (the gateway ran in it) goes with the test


def stream(url: str, traceparent: str | None, max_tokens: int = 8, texts: dict | None = None, index: int = 0) -> str:
    """A streamed completion's text, sent with `traceparent` (None: no header)."""
    headers = {"traceparent": traceparent} if traceparent else {}
    body = {"prompt": f"stream {index}", "max_tokens": max_tokens, "min_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}  # fmt: skip
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=REPLY_TIMEOUT_S) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                text += httpx.Response(200, content=line[6:]).json()["choices"][0]["text"]
                if texts is not None:
                    texts[index] = text
    return text


def test_a_streamed_request_through_pd_is_one_trace_under_the_clients_span(tiny_model, tmp_path, receiver):
    access_log = tmp_path / "access.jsonl"
    config = tiny_config(tmp_path, otlp_traces_endpoint=receiver.url, access_log=access_log, access_log_max_mb=0.002)
    with running_gateway(GRAPHS / "pd.yaml", config, model=tiny_model) as gw:
        trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
        stream(gw.url, f"00-{trace_id}-{client_span}-01")
        spans = {span.name: span for span in receiver.wait_for(trace_id, PD_SPANS + STEPS)}
        assert set(PD_SPANS + STEPS) <= set(spans), sorted(spans)
        request = spans["sagellm.request"]
        assert request.parent_id == client_span and request.service == "sagellm-gateway"
        assert all(span.parent_id == request.span_id for name, span in spans.items() if name in PD_SPANS[1:])
        assert spans["prefill_chunk"].parent_id == spans["prefill"].span_id  # the prompt in one chunk, then decoding
        assert spans["decode_steps"].parent_id == spans["decode"].span_id
        assert spans["decode_steps"].attributes["sagellm.steps"] == 7  # (the first token was the prefill worker's)
        assert spans["prefill"].service == "sagellm-worker:prefill"
        assert spans["kv_transfer"].service == spans["decode"].service == "sagellm-worker:decode"
        assert request.start_ns <= spans["admission"].start_ns <= spans["prefill"].start_ns
        assert spans["prefill"].end_ns <= spans["kv_transfer"].end_ns <= spans["decode"].end_ns <= request.end_ns
        assert spans["decode"].attributes["gen_ai.usage.output_tokens"] == 8
        assert request.attributes["gen_ai.usage.output_tokens"] == 8

        not_sampled = secrets.token_hex(16)
        stream(gw.url, f"00-{not_sampled}-{secrets.token_hex(8)}-00")
        stream(gw.url, None)  # a trace of its own, whose root is the request's span
        deadline = time.monotonic() + 20
        while not (roots := [s for s in receiver.spans if s.name == "sagellm.request" and not s.parent_id]):
            assert time.monotonic() < deadline, "no trace of the request without a traceparent"
            time.sleep(0.1)
        assert len(roots) == 1 and roots[0].trace_id not in (trace_id, not_sampled)
        assert receiver.trace(not_sampled) == []  # (sent before it: its spans would be here by now)

        lines = [json.loads(line) for line in access_log.read_text().splitlines()]
        traced = next(line for line in lines if line["trace_id"] == trace_id)  # the access log names the trace
        assert (traced["status"], traced["outcome"], traced["finish_reason"]) == (200, "completed", "length")
        assert traced["output_tokens"] == 8 and traced["prompt_tokens"] > 0 and traced["ttft_ms"] > 0
        assert traced["key"] is None and traced["instance"] == "prefill"
        refused = httpx.post(gw.url + "/v1/completions", json={"prompt": "", "max_tokens": 1}, timeout=30)
        assert refused.status_code == 400
        for _ in range(12):  # past the log's size (2 kB): it rotates
            stream(gw.url, None, max_tokens=1)
        assert (tmp_path / "access.jsonl.1").exists()
        every = [json.loads(line) for path in tmp_path.glob("access.jsonl*") for line in path.read_text().splitlines()]
        assert any(line["outcome"] == "refused" and line["status"] == 400 for line in every)


def test_a_resumed_stream_shows_its_resume_on_the_other_worker(tiny_model, tmp_path, receiver):
    graph = tmp_path / "two.yaml"
    graph.write_text(TWO_WORKERS.format(model=tiny_model))
    config = tiny_config(tmp_path, otlp_traces_endpoint=receiver.url)
    with running_gateway(graph, config) as gw:
        traces = {i: secrets.token_hex(16) for i in range(4)}
        texts: dict[int, str] = {}
        threads = [threading.Thread(target=stream, args=(gw.url, f"00-{traces[i]}-{secrets.token_hex(8)}-01", 100,
                                                         texts, i)) for i in range(4)]  # fmt: skip
        for thread in threads:
            thread.start()
        wait_for_streams_midway(texts, {}, more_than=3)
        os.kill(gw.core.executor.pids["engine_a"], signal.SIGKILL)
        for thread in threads:
            thread.join(REPLY_TIMEOUT_S)
        resumed = []
        for trace_id in traces.values():
            spans = receiver.wait_for(trace_id, ["sagellm.request", "engine"])
            request = next(s for s in spans if s.name == "sagellm.request")
            resumes = [s for s in spans if s.name == "engine" and s.attributes["sagellm.resumed_tokens"] > 0]
            if request.attributes["sagellm.retries"]:
                assert [s.attributes["sagellm.node"] for s in resumes] == ["engine_b"]
                assert resumes[0].service == "sagellm-worker:engine_b" and resumes[0].parent_id == request.span_id
                resumed.append(trace_id)
        assert resumed  # the streams engine_a held were resumed on engine_b, each a span of its own trace


def test_a_request_through_an_api_server_is_traced_under_the_clients_span(tiny_model, tmp_path, receiver):
    """The API server's span is the client's span's child and the core's parent; the engine's steps of a prompt
    longer than a step's budget are its chunks, each a span."""
    config = tiny_config(tmp_path, otlp_traces_endpoint=receiver.url)
    budget = {"engine.max_num_batched_tokens": 16}
    with running_gateway(GRAPHS / "colocated.yaml", config, model=tiny_model, api_servers=1, **budget) as gw:
        trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
        body = {"prompt": "one two three four five " * 8, "max_tokens": 4, "min_tokens": 4, "temperature": 0}
        headers = {"traceparent": f"00-{trace_id}-{client_span}-01"}
        reply = httpx.post(gw.url + "/v1/completions", json=body, headers=headers, timeout=REPLY_TIMEOUT_S)
        assert reply.status_code == 200, reply.text
        prompt_tokens = reply.json()["usage"]["prompt_tokens"]
        chunks = -(-prompt_tokens // 16)
        names = ["sagellm.api_server", "sagellm.request", "engine", "decode_steps"] + ["prefill_chunk"] * chunks
        spans = receiver.wait_for(trace_id, names)
        by_name = {span.name: span for span in spans}
        server = by_name["sagellm.api_server"]
        assert server.parent_id == client_span and server.service == "sagellm-api-server"
        assert by_name["sagellm.request"].parent_id == server.span_id
        engine = by_name["engine"]
        assert engine.parent_id == by_name["sagellm.request"].span_id
        assert engine.service == "sagellm-gateway"  # (colocated.yaml runs its engine in the gateway)
        chunked = sorted((s for s in spans if s.name == "prefill_chunk"), key=lambda s: s.attributes["sagellm.chunk"])
        assert [s.attributes["sagellm.chunk_tokens"] for s in chunked] == [16] * (chunks - 1) + [
            prompt_tokens - 16 * (chunks - 1)
        ]
        assert all(s.parent_id == engine.span_id for s in chunked)
        assert all(a.end_ns <= b.start_ns for a, b in zip(chunked, chunked[1:]))  # one step after another
        assert by_name["decode_steps"].attributes["sagellm.steps"] == 3
        assert (
            engine.start_ns <= chunked[0].start_ns and by_name["decode_steps"].end_ns <= engine.end_ns <= server.end_ns
        )


def test_a_call_to_another_server_carries_its_span_as_the_servers_traceparent(tiny_model, tmp_path, receiver):
    """A request a gateway sends to an OpenAI-compatible server it attached is a `remote_call` span, and its
    `traceparent` header makes the server's own spans (here another sageLLM's, which traces too) its children."""
    with running_upstream(tiny_model, tmp_path / "upstream") as upstream:
        config = tiny_config(tmp_path / "front", otlp_traces_endpoint=receiver.url, allowed_upstreams=LOCAL_UPSTREAMS)
        with running_gateway(GRAPHS / "control_plane.yaml", config) as front:
            admin = {"authorization": f"Bearer {front.gateway.admin_key}"}
            spec = {"model": "upstream", "kind": "openai", "url": upstream.url, "label": "up"}
            started = httpx.post(front.url + "/v1/management/engines", json=spec, headers=admin, timeout=30)
            assert started.status_code == 201, started.text
            engine_id = started.json()["id"]
            wait_until_ready(front.url, engine_id, admin)
            trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
            body = {"model": "upstream", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
            reply = httpx.post(front.url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S,
                               headers={"traceparent": f"00-{trace_id}-{client_span}-01"})  # fmt: skip
            assert reply.status_code == 200, reply.text
            spans = receiver.wait_for(trace_id, ["sagellm.request", "remote_call", "sagellm.request", "engine"])
    requests = sorted((s for s in spans if s.name == "sagellm.request"), key=lambda s: s.start_ns)
    assert len(requests) == 2, [s.name for s in spans]
    (call,) = [s for s in spans if s.name == "remote_call"]
    assert requests[0].parent_id == client_span and call.parent_id == requests[0].span_id
    assert call.attributes["sagellm.instance"] == engine_id and call.attributes["url.path"] == "/v1/completions"
    assert requests[1].parent_id == call.span_id  # the server's span of the request: under the gateway's call
    (engine,) = [s for s in spans if s.name == "engine"]
    assert engine.parent_id == requests[1].span_id


def wait_until_ready(url: str, engine_id: str, admin: dict[str, str]) -> None:
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/v1/management/engines/{engine_id}", headers=admin).json()["state"] != "ready":
        assert time.monotonic() < deadline, f"{engine_id} never became ready"
        time.sleep(0.05)
