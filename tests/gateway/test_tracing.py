"""Request traces exported with OTLP over HTTP (`--otlp-traces-endpoint`) to a real OTLP/HTTP endpoint in the test
process (`sagellm.benchmarks.otlp_sink`, OpenTelemetry's protobuf types): one streamed request through
graphs/pd.yaml is one trace under the client's `traceparent`, its spans recorded by the processes that did the work
(the gateway: the request, admission, the policy queue, pd_split, route; the prefill worker: prefill; the decode
worker: the KV transfer and decode); a request without a `traceparent` starts a trace of its own, one marked not
sampled is not traced; the access log (`--access-log`) has a line for each, naming its trace, and one for a refusal,
rotated by size; and a stream resumed after its worker was killed shows its resume as a span of the other worker."""

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
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config

pytestmark = pytest.mark.slow

PD_SPANS = ["sagellm.request", "admission", "policy_queue", "pd_split", "route", "prefill", "kv_transfer", "decode"]


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
        spans = {span.name: span for span in receiver.wait_for(trace_id, PD_SPANS)}
        assert set(PD_SPANS) <= set(spans), sorted(spans)
        request = spans["sagellm.request"]
        assert request.parent_id == client_span and request.service == "sagellm-gateway"
        assert all(span.parent_id == request.span_id for name, span in spans.items() if name != "sagellm.request")
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
    config = tiny_config(tmp_path, otlp_traces_endpoint=receiver.url)
    with running_gateway(GRAPHS / "colocated.yaml", config, model=tiny_model, api_servers=1) as gw:
        trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
        stream(gw.url, f"00-{trace_id}-{client_span}-01")
        spans = {span.name: span for span in receiver.wait_for(trace_id, ["sagellm.request", "engine"])}
        assert spans["sagellm.request"].parent_id == client_span
        assert spans["engine"].parent_id == spans["sagellm.request"].span_id
        assert spans["engine"].service == "sagellm-gateway"  # (colocated.yaml runs its engine in the gateway)
