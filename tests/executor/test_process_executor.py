"""The process executor over real ZeroMQ sockets and real worker processes: prefill and decode in two processes give
the same greedy tokens as one colocated engine, and a killed worker ends its requests with `instance_lost`."""

from __future__ import annotations

import os
import signal

import pytest
import trio

from sagellm.common.errors import InvalidInput
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.executor.process import ProcessExecutor
from sagellm.runtime.executor.run import run_pipeline
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.yaml_io import load_pipeline
from tests.executor.test_remote_workers import started
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow  # worker processes

PROMPTS = ["hello world", "the quick brown fox jumps over", "a", "over the lazy dog and far away"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("proc") / "llama")


def pd_yaml(model, prompts, transport="ipc", threshold=1, max_tokens=8, processes=True) -> str:
    items = ", ".join(f'"{p}"' for p in prompts)
    prefill_at, decode_at = (
        ('placement: "process:prefill", ', 'placement: "process:decode", ') if processes else ("", "")
    )
    return f"""
name: pd-test
model: {model}
transport: {transport}
nodes:
  source:
    {{op: prompt_source, params: {{prompts: [{items}], max_tokens: {max_tokens}, temperature: 0, ignore_eos: true}}}}
  admission: {{op: admission}}
  sort: {{op: policy_sort}}
  pd_split: {{op: pd_split, params: {{threshold_tokens: {threshold}}}}}
  route: {{op: route}}
  prefill: {{op: prefill, {prefill_at}params: {{max_num_seqs: 4}}}}
  kv_transfer: {{op: kv_transfer, {decode_at.rstrip(", ")}}}
  decode: {{op: decode, {decode_at}params: {{max_num_seqs: 4}}}}
  metrics: {{op: metrics_sink}}
edges:
  - source -> admission -> sort -> pd_split -> route
  - route -> [prefill, decode]
  - prefill -> kv_transfer -> decode -> metrics
"""


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_pd_across_processes_equals_pd_in_one_process(model_path, transport):
    pd = run_pipeline(load_pipeline(pd_yaml(model_path, PROMPTS, transport)))
    local = run_pipeline(load_pipeline(pd_yaml(model_path, PROMPTS, processes=False)))
    assert {rid: o.token_ids for rid, o in pd.outcomes.items()} == {r: o.token_ids for r, o in local.outcomes.items()}
    assert all(o.finish_reason == "length" and len(o.token_ids) == 8 for o in pd.outcomes.values())
    assert pd.operators["pd_split"].decisions["pd"] == len(PROMPTS)


async def test_a_killed_worker_ends_its_requests_with_instance_lost(tmp_path):
    long_context = make_tiny_llama(tmp_path / "long", max_position_embeddings=8192)
    graph = load_pipeline(pd_yaml(long_context, PROMPTS, max_tokens=8000))  # would run for a minute or more
    executor = ProcessExecutor(graph, peer_timeout_s=5)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            outcome = await started(nursery, executor)
            while not any(rid in executor.executor.outcomes for rid in ("req-0", "req-1")):  # tokens are flowing
                await trio.sleep(0.1)
            os.kill(executor.pids["decode"], signal.SIGKILL)
    result = outcome["result"]
    assert sorted(result.outcomes) == [f"req-{i}" for i in range(len(PROMPTS))]
    assert {o.error.code for o in result.outcomes.values()} == {"instance_lost"}
    assert all("'decode'" in o.error.message for o in result.outcomes.values())
    decode = executor.executor.instances["decode"]  # what /health and the gauges read: a dead engine, no load
    assert not decode.healthy and (decode.running, decode.waiting, decode.predicted_work) == (0, 0, 0)
    assert executor.executor.instances["decode"].healthy is False


def test_a_worker_that_fails_to_start_fails_the_run_at_once(model_path, tmp_path):
    good = 'decode: {op: decode, placement: "process:decode", params: {max_num_seqs: 4}}'
    bad = f'decode: {{op: decode, placement: "process:decode", params: {{model: "{tmp_path}/missing"}}}}'
    text = pd_yaml(model_path, PROMPTS)
    assert good in text
    # Its own error, of its kind (the user's to fix: exit code 2), not its exit code
    with pytest.raises(InvalidInput, match=r"'decode' failed before it was ready: \S+/missing: no such file"):
        trio.run(ProcessExecutor(load_pipeline(text.replace(good, bad)), startup_timeout_s=60).run)


JUNK = [
    [b"\xff\xfe", b"\x80", b"\x01", b"x"],  # node names that are not UTF-8 (a UnicodeDecodeError once killed the run)
    [b"decode"],  # too few frames
    [b"decode", b"source", b"\x09", b""],  # an unknown frame type
    [b"decode", b"source", b"\x01", b"\xc1\xc1\xc1"],  # not msgpack
    [b"decode", b"source", b"\x01", b"\x92\x01"],  # truncated msgpack
    [b"decode", b"source", b"\x01", b"\xdd\xff\xff\xff\xff"],  # an array claiming 4 billion items
    [b"decode", b"source", b"\x03", b"\x93\xa1x\x01\x80"],  # a heartbeat: no place on a data socket
    [b"nobody", b"nowhere", b"\x04", b"\x91\xa6source"],  # an End for an edge that does not exist
]


async def test_junk_on_every_data_socket_is_dropped_and_the_run_serves_on(model_path):
    """Each process's data socket may listen on a network: nothing sent to it can end the run or a request. The
    requests enter after the junk (the test feeds the run's source): a worker whose input has ended exits, and its
    socket with it."""
    import zmq

    graph = load_pipeline(pd_yaml(model_path, PROMPTS, transport="tcp", max_tokens=64))
    graph.nodes["source"].op, graph.nodes["source"].params = "http_source", {}
    executor = ProcessExecutor(graph, peer_timeout_s=10)
    zctx = zmq.Context()
    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                outcome = await started(nursery, executor)
                while not executor.data_endpoints:
                    await trio.sleep(0.05)
                for endpoint in executor.data_endpoints.values():
                    with zctx.socket(zmq.PUSH) as push:
                        push.linger = 10_000  # delivered by then, or the test fails instead of hanging
                        push.connect(endpoint)
                        for frames in JUNK * 3:
                            push.send_multipart(frames)
                source = executor.executor.operators["source"]
                source.wake = executor.executor.wake_sources
                sampling = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
                for i, prompt in enumerate(PROMPTS):
                    source.submit(Request(request_id=f"req-{i}", prompt=prompt, sampling=sampling, arrival_time=0.0))
                source.finish()
    finally:
        zctx.destroy(linger=0)
    result = outcome["result"]
    assert sorted(result.outcomes) == [f"req-{i}" for i in range(len(PROMPTS))]
    assert all(o.finish_reason == "length" and len(o.token_ids) == 64 for o in result.outcomes.values())
