"""Pipeline nodes in workers the run does not start (`placement: remote:GROUP`), as on another host: real tcp sockets
on 127.0.0.1, each worker a separate `sagellm worker --connect ...` process started by the test once the run listens.

A remote decode gives the same greedy tokens as the whole graph in one process; a worker that never comes fails the
start with the command to run; a worker killed mid-run ends its requests with `instance_lost`; workers the run must
refuse are told why; a worker whose run falls silent stops by itself."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq

from sagellm.runtime.comm import wire
from sagellm.runtime.comm.zmq_trio import bind_router, host_toward, with_host
from sagellm.runtime.executor.local import LocalExecutor
from sagellm.runtime.executor.process import ProcessExecutor, WorkerStartError
from sagellm.runtime.pipeline.yaml_io import dump_pipeline, load_pipeline
from tests.tiny_models import make_tiny_llama

SAGELLM = shutil.which("sagellm", path=str(Path(sys.executable).parent)) or "sagellm"
PROMPTS = ["hello world", "the quick brown fox jumps over", "a", "over the lazy dog and far away"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("remote") / "llama")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pd_yaml(
    model: Path, port: int, *, prefill: str = "task", decode: str = "remote:decode", max_tokens: int = 8
) -> str:
    items = ", ".join(f'"{p}"' for p in PROMPTS)
    return f"""
name: pd-remote-test
model: {model}
transport: tcp
control_port: {port}
nodes:
  source:
    {{op: prompt_source, params: {{prompts: [{items}], max_tokens: {max_tokens}, temperature: 0, ignore_eos: true}}}}
  admission: {{op: admission}}
  sort: {{op: policy_sort}}
  pd_split: {{op: pd_split, params: {{threshold_tokens: 1}}}}
  route: {{op: route}}
  prefill: {{op: prefill, placement: "{prefill}", params: {{max_num_seqs: 4}}}}
  kv_transfer: {{op: kv_transfer, placement: "{decode}"}}
  decode: {{op: decode, placement: "{decode}", params: {{max_num_seqs: 4}}}}
  metrics: {{op: metrics_sink}}
edges:
  - source -> admission -> sort -> pd_split -> route
  - route -> [prefill, decode]
  - prefill -> kv_transfer -> decode -> metrics
"""


def worker(port: int, group: str = "decode", *extra: str) -> subprocess.Popen:
    """`sagellm worker` as a user on the other host starts it: its own process, not a child the run knows of."""
    command = [SAGELLM, "worker", "--connect", f"tcp://127.0.0.1:{port}", "--group", group, *extra]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def started(nursery: trio.Nursery, executor: ProcessExecutor) -> dict[str, Any]:
    """Runs `executor` in `nursery` and returns once it listens for workers; its result lands in the returned
    dict's "result" when the run ends."""
    outcome: dict[str, Any] = {}

    async def run() -> None:
        outcome["result"] = await executor.run()

    nursery.start_soon(run)
    while executor.control_endpoint is None:
        await trio.sleep(0.05)
    return outcome


@pytest.mark.slow
async def test_a_remote_decode_worker_gives_the_tokens_of_one_process(model_path):
    port = free_port()
    executor = ProcessExecutor(load_pipeline(pd_yaml(model_path, port)))
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            outcome = await started(nursery, executor)
            assert executor.control_endpoint == f"tcp://127.0.0.1:{port}"
            decode = worker(port)
    local = await LocalExecutor(load_pipeline(pd_yaml(model_path, port, prefill="task", decode="task"))).run()
    result = outcome["result"]
    assert {r: o.token_ids for r, o in result.outcomes.items()} == {r: o.token_ids for r, o in local.outcomes.items()}
    assert all(o.finish_reason == "length" and len(o.token_ids) == 8 for o in result.outcomes.values())
    assert decode.wait(timeout=30) == 0  # it ended with the run


@pytest.mark.slow
def test_a_remote_worker_that_never_connects_fails_the_start_naming_the_command(model_path):
    port = free_port()
    executor = ProcessExecutor(load_pipeline(pd_yaml(model_path, port)), startup_timeout_s=2)
    command = f"sagellm worker --connect tcp://127.0.0.1:{port} --group decode"
    with pytest.raises(WorkerStartError, match=rf"\['decode'\] did not connect within 2 s; start them: {command}"):
        trio.run(executor.run)


@pytest.mark.slow
async def test_a_killed_remote_worker_ends_its_requests_with_instance_lost(tmp_path):
    """Workers the run must refuse are tried first, while it runs (it generates for minutes unless stopped)."""
    long_context = make_tiny_llama(tmp_path / "long", max_position_embeddings=8192)
    port = free_port()
    graph = load_pipeline(pd_yaml(long_context, port, prefill="process:prefill", max_tokens=8000))
    executor = ProcessExecutor(graph, peer_timeout_s=3)
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            outcome = await started(nursery, executor)
            decode = worker(port)
            while not executor.executor.outcomes:  # tokens are flowing back from the remote decode
                await trio.sleep(0.1)
            refused = [worker(port, group, "--connect-timeout", "60") for group in ("decode", "prefill", "nope")]
            errors = [(await trio.to_thread.run_sync(p.communicate))[1] for p in refused]
            assert not any(o.finished for o in executor.executor.outcomes.values())
            os.kill(decode.pid, signal.SIGKILL)
    assert [p.returncode for p in refused] == [2, 2, 2]
    assert "group 'decode' already has a worker: remote worker 'decode' (pid" in errors[0]
    assert "group 'prefill' is placed 'process': the graph starts its worker itself" in errors[1]
    assert "the graph has no group 'nope' for a worker started by hand; its remote groups: decode" in errors[2]
    result = outcome["result"]
    decode.wait()
    assert sorted(result.outcomes) == [f"req-{i}" for i in range(len(PROMPTS))]
    assert {o.error.code for o in result.outcomes.values()} == {"instance_lost"}
    assert all("remote worker 'decode'" in o.error.message for o in result.outcomes.values())
    assert executor.executor.instances["decode"].healthy is False


@pytest.mark.slow
async def test_a_worker_stops_by_itself_when_no_run_answers_or_the_run_falls_silent(model_path):
    """The silent run is a bare control socket that answers the Hello and then says nothing more, as a run on a host
    that crashed or dropped off the network would. Until the run's go (its Ready with every group's endpoint) the
    worker waits as long as for the run's first answer (`--connect-timeout`: the run and its workers load models on
    a busy machine); after it, the run's own `peer_timeout_s`."""
    lonely_port, port = free_port(), free_port()
    lonely = worker(lonely_port, "decode", "--connect-timeout", "1")
    zctx = zmq.Context()
    control, _ = bind_router(zctx, "tcp", "control", port=port)
    graph = dump_pipeline(load_pipeline(pd_yaml(model_path, port)))
    try:
        with control, trio.fail_after(120):
            before_go, after_go = worker(port, "decode", "--connect-timeout", "3"), None
            frames = await control.receive_frames()
            hello = wire.decode(frames[1:])
            assert isinstance(hello, wire.Hello) and (hello.node, hello.pid) == ("decode", before_go.pid)
            await control.send_frames([frames[0], *wire.encode(wire.Assign(graph=graph, peer_timeout_s=1.5))])
            _, stderr = await trio.to_thread.run_sync(before_go.communicate)

            after_go = worker(port, "decode", "--connect-timeout", "60")
            identity, ready = None, None
            while not isinstance(ready, wire.Ready):  # the first worker's last messages (its Ready too) are skipped
                identity, *rest = await control.receive_frames()
                message = wire.decode(rest)
                if getattr(message, "pid", None) != after_go.pid:
                    continue
                ready = message
                if isinstance(message, wire.Hello):
                    await control.send_frames([identity, *wire.encode(wire.Assign(graph=graph, peer_timeout_s=1.5))])
            peers = {"main": f"tcp://127.0.0.1:{free_port()}", "decode": ready.info["endpoint"]}
            await control.send_frames([identity, *wire.encode(wire.Ready(node="main", pid=0, info={"peers": peers}))])
            _, running_stderr = await trio.to_thread.run_sync(after_go.communicate)
            _, lonely_stderr = await trio.to_thread.run_sync(lonely.communicate)
    finally:
        zctx.term()
    assert (before_go.returncode, after_go.returncode, lonely.returncode) == (2, 2, 2)
    assert "the run fell silent for 3 s (gone or unreachable); stopping" in stderr
    assert "the run fell silent for 2 s (gone or unreachable); stopping" in running_stderr  # 1.5 s, rounded
    expected = f"no answer from tcp://127.0.0.1:{lonely_port} after 1 s: is the graph running, the port open?"
    assert expected in lonely_stderr


def test_endpoints_as_others_reach_them():
    assert with_host("tcp://0.0.0.0:5555", "node7") == "tcp://node7:5555"
    assert with_host("ipc:///tmp/x/decode-1-0", "node7") == "ipc:///tmp/x/decode-1-0"
    assert host_toward("tcp://127.0.0.1:5555") == "127.0.0.1"
    with pytest.raises(OSError, match="cannot find a route to tcp://no-such-host.invalid:1"):
        host_toward("tcp://no-such-host.invalid:1")


@pytest.mark.slow
def test_a_lost_remote_worker_started_again_rejoins_the_serving_run(tmp_path):
    """Behind the gateway (a run that goes on): the remote decode is killed, the user starts it again with the same
    command, and it takes its group back; the graph serves the same greedy text as before."""
    from tests.chaos.test_worker_faults import complete, probe
    from tests.gateway.conftest import running_gateway, tiny_config

    def wait_for(url: str, state: tuple[int, int, list[str]]) -> tuple[int, int, list[str]]:
        deadline = time.monotonic() + 120
        while probe(url) != state and time.monotonic() < deadline:
            time.sleep(0.1)
        return probe(url)

    model, port = make_tiny_llama(tmp_path / "llama"), free_port()
    path = tmp_path / "pd_remote.yaml"
    path.write_text(pd_yaml(model, port))
    first = worker(port)
    try:
        with running_gateway(path, tiny_config(tmp_path)) as gw:
            reference = complete(gw.url)
            first.kill()
            waiting = (200, 503, ["ready", "recovering"])  # alive, not ready: waiting for its worker
            assert wait_for(gw.url, waiting) == waiting
            second = worker(port)
            try:
                assert wait_for(gw.url, (200, 200, ["ready", "ready"])) == (200, 200, ["ready", "ready"])
                assert complete(gw.url) == reference
            finally:
                second.terminate()
    finally:
        first.kill()
