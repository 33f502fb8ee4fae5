"""CURVE on the links of a secure run, over real tcp sockets on 127.0.0.1 (`secure: true` forces what listening beyond
loopback turns on): only clients holding the run's key get a message delivered, a stranger's key or plaintext fails the
handshake and the server serves on; a graph over secure links gives the same greedy tokens as one process, and junk
or forged messages sent in plaintext to every endpoint never arrive; a worker started by hand joins with the run's key
file and says to pass one without it; key files and the `secure` setting are checked."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq
from zmq.utils.monitor import recv_monitor_message

from sagellm.common.private_files import OpenFileError
from sagellm.runtime.comm import wire
from sagellm.runtime.comm.curve import RUN_KEY_ENV, RunKeyError, RunKeys, authenticator, child_env
from sagellm.runtime.comm.zmq_trio import bind_pull, bind_router, connect_push
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.executor import remote_workers
from sagellm.runtime.executor.local import LocalExecutor
from sagellm.runtime.executor.process import ProcessExecutor
from sagellm.runtime.executor.run import run_pipeline
from sagellm.runtime.executor.worker import WorkerError, run_worker
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.spec import PipelineError, is_secure
from sagellm.runtime.pipeline.yaml_io import load_pipeline
from tests.executor.test_process_executor import JUNK, PROMPTS, pd_yaml
from tests.executor.test_remote_workers import free_port, started
from tests.executor.test_remote_workers import pd_yaml as remote_pd_yaml
from tests.executor.test_remote_workers import worker as remote_worker
from tests.tiny_models import make_tiny_llama

SILENCE_S = 1.5  # how long a message that must not arrive is waited for
MANY_TOKENS = 600  # a run of a few seconds: it is still running while the test sends to it


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("curve") / "llama")


def secure_pd_yaml(model: Path, **args: Any) -> str:
    text = pd_yaml(model, PROMPTS, transport="tcp", **args)
    assert "transport: tcp\n" in text
    return text.replace("transport: tcp\n", "transport: tcp\nsecure: true\n")


def client(ctx: zmq.Context, kind: int, endpoint: str | None, how: str, keys: RunKeys) -> zmq.Socket:
    """A socket of another process toward a secure server (connected unless `endpoint` is None): `run key` (as the
    run's own), `stranger` (knows the server's public key, presents its own keypair), `other run` (another run's
    keys entirely), `plaintext`."""
    sock = ctx.socket(kind)
    sock.linger = 0
    if how == "run key":
        keys.join(sock)
    elif how == "stranger":
        sock.curve_serverkey = keys.public
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    elif how == "other run":
        RunKeys.generate().join(sock)
    else:
        assert how == "plaintext"
    if endpoint is not None:
        sock.connect(endpoint)
    return sock


def handshake(ctx: zmq.Context, kind: int, endpoint: str, how: str, keys: RunKeys) -> str:
    """How a `kind` client's handshakes with `endpoint` end within 10 s: "ok" once one succeeds, else how the first
    failed: "refused" (by the server's ZAP handler) or "failed" (anything else: plaintext meeting CURVE fails with a
    protocol error, or a broken pipe when the server hangs up first). A client with the run's key is given the whole
    window, through ZeroMQ's own reconnects (a server busy enough to drop one handshake is not a refusal); any other
    client's first failure decides. Use the socket type the server pairs with: PUSH for a PULL, DEALER for a ROUTER."""
    sock = client(ctx, kind, None, how, keys)
    monitor = sock.get_monitor_socket()
    deadline = time.monotonic() + 10
    first_failure: str | None = None
    try:
        sock.connect(endpoint)
        while monitor.poll(max(0, int(1000 * (deadline - time.monotonic())))):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return "ok"
            if event.name.startswith("HANDSHAKE_FAILED"):
                failure = "refused" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "failed"
                if how != "run key":
                    return failure
                first_failure = first_failure or failure
        return first_failure or "no handshake in 10 s"
    finally:
        sock.disable_monitor()
        monitor.close()
        sock.close()


async def received(receive: Callable[[], Awaitable[Any]], within: float = SILENCE_S) -> Any:
    """What `receive()` returns within `within` seconds; None if nothing does."""
    with trio.move_on_after(within):
        return await receive()
    return None


async def answer(sock: zmq.Socket) -> list[bytes]:
    """The next message on a plain (not trio) socket."""
    while not sock.poll(0):
        await trio.sleep(0.05)
    return sock.recv_multipart()


# -- a secure socket pair ---------------------------------------------------------------------------------------------
async def test_only_clients_holding_the_run_key_deliver_and_the_server_serves_on(ctx: zmq.Context) -> None:
    keys = RunKeys.generate()
    others = zmq.Context()  # other processes' sockets
    try:
        with authenticator(ctx, keys):
            pull, endpoint = bind_pull(ctx, "tcp", "decode", keys=keys)
            with pull, trio.fail_after(30):
                for how in ("stranger", "other run", "plaintext"):
                    with client(others, zmq.PUSH, endpoint, how, keys) as push:
                        for frames in JUNK:
                            push.send_multipart(frames, flags=zmq.NOBLOCK)  # queued, until a handshake that fails
                        push.send(b"from " + how.encode(), flags=zmq.NOBLOCK)
                        assert await received(pull.receive_frames) is None, f"a {how} client delivered"
                for _ in range(2):  # the server serves on, for a second client too
                    with connect_push(others, endpoint, keys=keys) as push:
                        await push.send(wire.End(node="prefill"))
                        assert await pull.receive() == wire.End(node="prefill")
                hows = ("run key", "stranger", "other run", "plaintext")
                # A stranger who knows the run's public key passes every check but the ZAP handler's.
                assert [handshake(others, zmq.PUSH, endpoint, how, keys) for how in hows] == [
                    "ok", "refused", "failed", "failed"
                ]  # fmt: skip
    finally:
        others.destroy(linger=0)


async def test_plain_sockets_stay_plain_and_a_secure_client_cannot_reach_them(ctx: zmq.Context) -> None:
    """ipc and loopback tcp keep the plaintext path; mixing the two fails the handshake, both ways."""
    pull, endpoint = bind_pull(ctx, "tcp", "decode")
    with pull:
        assert not pull.socket.curve_server and pull.socket.mechanism == zmq.NULL
        assert handshake(ctx, zmq.PUSH, endpoint, "run key", RunKeys.generate()) == "failed"


async def test_a_worker_without_the_key_says_to_pass_one(ctx: zmq.Context) -> None:
    """The worker cannot tell a secure run from an absent one (it gets no answer at all): the message covers both."""
    keys = RunKeys.generate()
    with authenticator(ctx, keys):
        router, endpoint = bind_router(ctx, "tcp", "control", keys=keys)
        with router, trio.fail_after(30):
            for wrong in (None, RunKeys.generate()):  # no key; a key of another run
                with pytest.raises(WorkerError, match="no answer .* after 2 s.*If the run is secure, pass --key-file"):
                    await run_worker(endpoint, "decode", connect_timeout_s=2, keys=wrong)
            assert await received(router.receive_frames, within=0.2) is None


# -- keys -------------------------------------------------------------------------------------------------------------
def test_keys_round_trip_through_text_env_and_file(tmp_path: Path) -> None:
    keys = RunKeys.generate()
    assert RunKeys.from_text(keys.text() + "\n", "test") == keys
    assert keys.secret.decode() not in repr(keys)
    env = child_env(keys, {"PATH": "/bin", RUN_KEY_ENV: "an inherited key"})
    assert env == {"PATH": "/bin", RUN_KEY_ENV: keys.text()}
    assert RunKeys.from_env(env) == keys
    assert child_env(None, {"PATH": "/bin", RUN_KEY_ENV: "x"}) == {"PATH": "/bin"}  # a plain run hands none on
    path = tmp_path / "keys" / "pd-5555.key"
    keys.write(path)
    assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    assert RunKeys.read(path) == keys
    with pytest.raises(RunKeyError, match="not a run key"):
        RunKeys.from_text("," * 40, "test")
    with pytest.raises(RunKeyError, match="expected the run's key"):
        RunKeys.from_text("short", RUN_KEY_ENV)
    with pytest.raises(RunKeyError, match="No such file"):
        RunKeys.read(tmp_path / "missing.key")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_file_others_can_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "run.key"
    RunKeys.generate().write(path)
    os.chmod(path, mode)
    with pytest.raises(OpenFileError, match=rf"permissions {mode:04o}, too open .*chmod 600 {path}"):
        RunKeys.read(path)


def test_the_worker_command_refuses_an_open_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sagellm.cli.main import main

    path = tmp_path / "run.key"
    RunKeys.generate().write(path)
    os.chmod(path, 0o644)
    command = ["worker", "--connect", "tcp://127.0.0.1:1", "--group", "decode", "--key-file", str(path)]
    assert main(command) == 2
    assert "sagellm worker: error: " in capsys.readouterr().err


# -- the `secure` setting ---------------------------------------------------------------------------------------------
def test_secure_is_on_exactly_beyond_loopback_unless_set() -> None:
    assert not is_secure({}) and not is_secure({"transport": "ipc"})
    assert not is_secure({"transport": "tcp"}) and not is_secure({"transport": "tcp", "bind_host": "localhost"})
    assert is_secure({"transport": "tcp", "bind_host": "0.0.0.0"}) and is_secure({"transport": "tcp", "bind_host": "h"})
    assert is_secure({"transport": "tcp", "secure": True}) and not is_secure(
        {"transport": "tcp", "bind_host": "0.0.0.0", "secure": False}
    )


@pytest.mark.parametrize("value", ["true", "false"])
def test_secure_on_an_ipc_graph_is_an_error_naming_the_field(tmp_path: Path, value: str) -> None:
    text = pd_yaml(tmp_path, PROMPTS).replace("transport: ipc\n", f"transport: ipc\nsecure: {value}\n")
    with pytest.raises(PipelineError, match="secure: applies to sockets on tcp only") as error:
        load_pipeline(text)
    assert error.value.field == "secure"


def test_secure_must_be_a_bool(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="secure: expected bool"):
        load_pipeline(secure_pd_yaml(tmp_path).replace("secure: true", "secure: maybe"))


# -- a run over secure links ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pd_over_secure_links_equals_pd_in_one_process(model_path: Path, tmp_path: Path) -> None:
    graph = load_pipeline(secure_pd_yaml(model_path))
    assert is_secure(graph.attrs)
    secure = run_pipeline(graph)
    local = run_pipeline(load_pipeline(pd_yaml(model_path, PROMPTS, processes=False)))
    assert {r: o.token_ids for r, o in secure.outcomes.items()} == {r: o.token_ids for r, o in local.outcomes.items()}
    assert all(o.finish_reason == "length" and len(o.token_ids) == 8 for o in secure.outcomes.values())


@pytest.mark.slow
async def test_plaintext_junk_on_every_endpoint_of_a_secure_run_never_arrives(tmp_path: Path) -> None:
    """Junk, forged Ends of every edge and a Hello, all in plaintext, to every data socket and the control socket:
    none arrives (a forged End would end its edge early, a Hello would be answered), and the run finishes every
    request. Every endpoint is a CURVE server that admits the run's key. The requests enter only after the checks
    (the test feeds the run's source): a worker whose input has ended exits, and its socket with it."""
    long_context = make_tiny_llama(tmp_path / "long", max_position_embeddings=2048)
    graph = load_pipeline(secure_pd_yaml(long_context, max_tokens=MANY_TOKENS))
    graph.nodes["source"].op, graph.nodes["source"].params = "http_source", {}
    executor = ProcessExecutor(graph, peer_timeout_s=10)
    assert executor.keys is not None and executor.key_file is None  # no remote group: no key file
    edges = [("route", "decode"), ("route", "prefill"), ("prefill", "kv_transfer"), ("decode", "metrics")]
    forged = [[dst.encode(), src.encode(), *wire.encode(wire.End(node=src))] for src, dst in edges]
    hello = wire.encode(wire.Hello(node="decode", pid=1, host=socket.gethostname(), protocol=wire.PROTOCOL))
    zctx = zmq.Context()
    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                outcome = await started(nursery, executor)
                while not executor.data_endpoints:
                    await trio.sleep(0.05)
                assert executor.control_endpoint is not None
                kinds = {endpoint: zmq.PUSH for endpoint in executor.data_endpoints.values()}
                kinds[executor.control_endpoint] = zmq.DEALER
                sockets = [client(zctx, kind, endpoint, "plaintext", executor.keys) for endpoint, kind in kinds.items()]
                for how, result in (("run key", "ok"), ("plaintext", "failed")):
                    for endpoint, kind in kinds.items():
                        ended = await trio.to_thread.run_sync(handshake, zctx, kind, endpoint, how, executor.keys)
                        assert ended == result, f"{how} to {endpoint}"
                assert "result" not in outcome, "the run ended before its endpoints were checked"
                for sock in sockets:
                    for frames in [*JUNK, *forged, hello] * 3:
                        with contextlib.suppress(zmq.Again):  # its handshake already failed: not even queued
                            sock.send_multipart(frames, flags=zmq.NOBLOCK)
                assert await received(lambda: answer(sockets[-1])) is None, "the run answered a plaintext Hello"
                for sock in sockets:
                    sock.close()
                source = executor.executor.operators["source"]
                source.wake = executor.executor.wake_sources
                sampling = SamplingParams(max_tokens=MANY_TOKENS, temperature=0, ignore_eos=True)
                for i, prompt in enumerate(PROMPTS):
                    source.submit(Request(request_id=f"req-{i}", prompt=prompt, sampling=sampling, arrival_time=0.0))
                source.finish()
    finally:
        zctx.destroy(linger=0)
    result = outcome["result"]
    assert sorted(result.outcomes) == [f"req-{i}" for i in range(len(PROMPTS))]
    assert all(o.finish_reason == "length" and len(o.token_ids) == MANY_TOKENS for o in result.outcomes.values())


@pytest.mark.slow
async def test_a_remote_worker_joins_a_secure_run_with_the_key_file_only(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run writes its key for workers started by hand and prints the command that passes it; a worker without it
    gets no answer and says to pass one; with it, the run gives the tokens of one process; the file goes with the
    run."""
    monkeypatch.setattr(remote_workers, "keys_dir", lambda: tmp_path / "keys")  # not the whole home: kernels stay built
    monkeypatch.delenv(RUN_KEY_ENV, raising=False)
    port = free_port()
    text = remote_pd_yaml(model_path, port).replace("transport: tcp\n", "transport: tcp\nsecure: true\n")
    executor = ProcessExecutor(load_pipeline(text))
    key_file = tmp_path / "keys" / f"pd-remote-test-{port}.key"
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            outcome = await started(nursery, executor)
            assert executor.key_file == key_file and key_file.stat().st_mode & 0o777 == 0o600
            assert RunKeys.read(key_file) == executor.keys
            command = f"sagellm worker --connect tcp://127.0.0.1:{port} --group decode --key-file {key_file}"
            assert executor.worker_command("decode") == command
            assert f"on its host run: {command}" in capsys.readouterr().err
            keyless = remote_worker(port, "decode", "--connect-timeout", "2")
            assert (await trio.to_thread.run_sync(keyless.communicate))[1].count("pass --key-file") == 1
            assert keyless.returncode == 2
            decode = remote_worker(port, "decode", "--key-file", str(key_file))
    assert not key_file.exists()
    local = await LocalExecutor(load_pipeline(remote_pd_yaml(model_path, port, decode="task"))).run()
    result = outcome["result"]
    assert {r: o.token_ids for r, o in result.outcomes.items()} == {r: o.token_ids for r, o in local.outcomes.items()}
    assert decode.wait(timeout=30) == 0
