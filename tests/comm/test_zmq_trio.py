"""TrioSocket over real ipc:// and tcp://127.0.0.1 sockets inside trio: ordered delivery both ways at once, fan-in,
backpressure at a tiny HWM without deadlock, closing that never hangs, heartbeats; and PeerMonitor on a virtual
clock. Every test is bounded by `trio.fail_after`, so a lost wake-up fails instead of hanging."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

import pytest
import torch
import trio
import zmq

from sagellm.common.peer_monitor import PeerMonitor
from sagellm.runtime.comm.wire import End, Heartbeat, Ready, encode
from sagellm.runtime.comm.zmq_trio import (
    IPC_DIR_ENV,
    TrioSocket,
    address,
    announce_ready,
    bind_pull,
    connect_push,
    heartbeat_loop,
)
from sagellm.runtime.pipeline.messages import KVBlocks, PrefillDone, Request, TokenDelta

TRANSPORTS = ["ipc", "tcp"]


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def item(i: int) -> Request | TokenDelta | PrefillDone:
    """A mix of item types, one in three carrying a small tensor; fixed times, so equal items compare equal."""
    if i % 3 == 0:
        return Request(request_id=str(i), prompt_token_ids=[i, i + 1], arrival_time=0.0)
    if i % 3 == 1:
        return TokenDelta(request_id=str(i), token_ids=[i], time=0.0)
    kv = torch.full((2, 2, 3, 1, 4), float(i))  # [layers, k/v, tokens, kv heads, head_dim]
    return PrefillDone(
        request_id=str(i), request=Request(request_id=str(i)), first_token=i, first_token_time=0.0,
        kv=KVBlocks(num_tokens=3, data=kv),
    )  # fmt: skip


def same(a: object, b: object) -> bool:
    if isinstance(a, PrefillDone):
        return a.request_id == b.request_id and torch.equal(a.kv.data, b.kv.data)
    return a == b


def test_address_shapes() -> None:
    assert address("tcp", "x") == "tcp://127.0.0.1:*"
    first, second = address("ipc", "decode/0 node"), address("ipc", "decode/0 node")
    assert first.startswith("ipc://") and first != second  # unique per call, in the run's directory
    assert os.path.dirname(first.removeprefix("ipc://")) == os.environ[IPC_DIR_ENV]
    assert re.fullmatch(rf"decode_0_node-{os.getpid()}-\d+", os.path.basename(first))
    assert len(address("ipc", "n" * 500)) - len("ipc://") <= 107
    with pytest.raises(ValueError, match="unknown transport 'udp'"):
        address("udp", "x")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_many_messages_both_ways_at_once(ctx: zmq.Context, transport: str) -> None:
    n = 300
    pull_a, endpoint_a = bind_pull(ctx, transport, "a")
    pull_b, endpoint_b = bind_pull(ctx, transport, "b")
    assert endpoint_a.startswith(f"{transport}://") and "*" not in endpoint_a
    with pull_a, pull_b, connect_push(ctx, endpoint_b) as to_b, connect_push(ctx, endpoint_a) as to_a:
        got: dict[str, list] = {"a": [], "b": []}

        async def send_all(sock: TrioSocket) -> None:
            for i in range(n):
                await sock.send(item(i))

        async def receive_all(sock: TrioSocket, name: str) -> None:
            for _ in range(n):
                got[name].append(await sock.receive())

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all, to_a)
                nursery.start_soon(send_all, to_b)
                nursery.start_soon(receive_all, pull_a, "a")
                nursery.start_soon(receive_all, pull_b, "b")
    for name in "ab":
        assert all(same(m, item(i)) for i, m in enumerate(got[name])), name


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_fan_in_of_two_pushes_keeps_each_senders_order(ctx: zmq.Context, transport: str) -> None:
    pull, endpoint = bind_pull(ctx, transport, "merge")
    with pull, connect_push(ctx, endpoint) as one, connect_push(ctx, endpoint) as two:

        async def send_all(sock: TrioSocket, node: str) -> None:
            for i in range(100):
                await sock.send(TokenDelta(request_id=node, token_ids=[i]))
            await sock.send(End(node=node))

        received: list = []
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all, one, "one")
                nursery.start_soon(send_all, two, "two")
                ended = 0
                while ended < 2:
                    msg = await pull.receive()
                    ended += isinstance(msg, End)
                    received.append(msg)
    for node in ("one", "two"):
        assert [m.token_ids[0] for m in received if isinstance(m, TokenDelta) and m.request_id == node] == list(
            range(100)
        )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tiny_hwm_applies_backpressure_without_deadlock(ctx: zmq.Context, transport: str) -> None:
    """Two tasks share one PUSH at HWM 1 while the receiver is paused: sends wait (bounded memory), then all
    arrive once it drains. 1 MB payloads so the kernel's socket buffers cannot hide the HWM."""
    n = 40
    pull, endpoint = bind_pull(ctx, transport, "slow", hwm=1)
    sent = 0
    with pull, connect_push(ctx, endpoint, hwm=1) as push:

        async def send_half(offset: int) -> None:
            nonlocal sent
            for i in range(offset, n, 2):
                kv = torch.full((2, 2, 256, 4, 64), float(i))  # 1 MiB
                await push.send(PrefillDone(
                    request_id=str(i), request=Request(request_id=str(i)), first_token=i, first_token_time=0.0,
                    kv=KVBlocks(num_tokens=256, data=kv),
                ))  # fmt: skip
                sent += 1

        values: list[float] = []
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_half, 0)
                nursery.start_soon(send_half, 1)
                await trio.sleep(0.3)
                assert sent < n // 2  # the senders are held back while nobody receives
                for _ in range(n):
                    values.append(float((await pull.receive()).kv.data[0, 0, 0, 0, 0]))
        assert sorted(values) == [float(i) for i in range(n)]


async def test_close_wakes_a_waiting_receiver_and_never_hangs(ctx: zmq.Context) -> None:
    pull, endpoint = bind_pull(ctx, "ipc", "closing")
    push = connect_push(ctx, "tcp://127.0.0.1:9")  # nobody listens: sends only queue
    with trio.fail_after(10):
        await push.send(End(node="x"))  # queued for a peer that never comes
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await pull.receive()

            nursery.start_soon(receive)
            await trio.sleep(0.05)
            pull.close()
        push.close()
        push.close()  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            await push.send(End(node="x"))
        await trio.to_thread.run_sync(ctx.term)  # LINGER bounds the wait for the unsent message


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_ready_then_heartbeats_with_stats(ctx: zmq.Context, transport: str) -> None:
    pull, endpoint = bind_pull(ctx, transport, "control")
    with pull, connect_push(ctx, endpoint) as push, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await announce_ready(push, "decode-0", {"endpoint": "ipc:///x"})
            nursery.start_soon(heartbeat_loop, push, "decode-0", 0.01, lambda: {"decode-0": {"running": 2}})
            ready = await pull.receive()
            beats = [await pull.receive() for _ in range(3)]
            nursery.cancel_scope.cancel()
    assert ready == Ready(node="decode-0", pid=os.getpid(), info={"endpoint": "ipc:///x"})
    assert all(isinstance(b, Heartbeat) and b.stats == {"decode-0": {"running": 2}} for b in beats)
    assert beats[0].time <= beats[1].time <= beats[2].time


async def test_peer_monitor_marks_a_silent_peer_lost(autojump_clock: trio.abc.Clock) -> None:
    monitor = PeerMonitor(timeout=3.0)
    lost: list[tuple[str, float]] = []
    start = trio.current_time()

    async def beat(peer: str, times: int) -> None:
        for _ in range(times):
            monitor.seen(peer)
            await trio.sleep(1.0)

    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor.watch, lambda peer: lost.append((peer, trio.current_time() - start)))
            nursery.start_soon(beat, "steady", 50)
            nursery.start_soon(beat, "quits", 5)  # last seen at t=4
            await trio.sleep(2.0)
            nursery.start_soon(beat, "late", 3)  # joins at t=2, last seen at t=4
            monitor.seen("ended")
            monitor.forget("ended")  # sent End: no longer watched
            await trio.sleep(20.0)
            nursery.cancel_scope.cancel()
    assert sorted(lost) == [("late", 7.0), ("quits", 7.0)]
    assert monitor.lost() == [] and monitor.next_deadline() < float("inf")  # "steady" is still watched


def test_peer_monitor_logic_on_a_fake_clock() -> None:
    now = [0.0]
    monitor = PeerMonitor(timeout=2.0, clock=lambda: now[0])
    assert monitor.next_deadline() == float("inf")
    monitor.seen("p")
    now[0] = 1.5
    monitor.seen("q")
    assert monitor.lost() == [] and monitor.next_deadline() == 2.0
    now[0] = 2.0
    assert monitor.lost() == ["p"]
    with pytest.raises(ValueError, match="timeout must be > 0"):
        PeerMonitor(timeout=0)


async def test_one_socket_sending_and_receiving_at_once(ctx: zmq.Context) -> None:
    """A PAIR socket per side, each with a sending and a receiving task at a small HWM: a send can consume the FD edge
    a receive waits for, so this hangs unless every operation wakes the other waiters."""
    n = 500
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    for sock in (a, b):
        sock.setsockopt(zmq.SNDHWM, 2)
        sock.setsockopt(zmq.RCVHWM, 2)
    a.bind("tcp://127.0.0.1:*")
    b.connect(a.getsockopt_string(zmq.LAST_ENDPOINT))
    got: dict[int, list[int]] = {0: [], 1: []}
    with TrioSocket(a) as side_a, TrioSocket(b) as side_b, trio.fail_after(20):

        async def send_all(sock: TrioSocket) -> None:
            for i in range(n):
                await sock.send(TokenDelta(request_id="r", token_ids=[i] * 100, time=0.0))

        async def receive_all(sock: TrioSocket, key: int) -> None:
            for _ in range(n):
                got[key].append((await sock.receive()).token_ids[0])

        async with trio.open_nursery() as nursery:
            for key, sock in enumerate((side_a, side_b)):
                nursery.start_soon(send_all, sock)
                nursery.start_soon(receive_all, sock, key)
    assert got == {0: list(range(n)), 1: list(range(n))}


async def test_a_blocked_send_that_consumes_the_receivers_wakeup_still_wakes_it(ctx: zmq.Context) -> None:
    """The edge-trigger race, made deterministic over inproc://: a message reaches A while A's receiver sleeps on the
    FD, and before trio polls that FD a send on A finds the queue full and reads EVENTS, which drains the FD. Without
    passing the news on, the receiver (and so this test) would wait forever."""
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    for sock in (a, b):
        sock.setsockopt(zmq.SNDHWM, 1)
        sock.setsockopt(zmq.RCVHWM, 1)
    a.bind("inproc://race")
    b.connect("inproc://race")
    queued = 0
    with contextlib.suppress(zmq.Again):
        while True:  # fill A → B: A's next send must wait
            a.send_multipart(encode(End(node="fill")), flags=zmq.NOBLOCK)
            queued += 1
    received: list = []
    got_message = trio.Event()
    with TrioSocket(a) as side_a, TrioSocket(b) as side_b, trio.fail_after(5):

        async def receive() -> None:
            received.append(await side_a.receive())
            got_message.set()

        async def drain() -> None:  # B reads only once A's receiver got its message
            await got_message.wait()
            for _ in range(queued + 1):
                received.append(await side_b.receive())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(drain)
            await trio.sleep(0.05)  # the receiver now sleeps on A's FD
            b.send_multipart(encode(End(node="b")))  # inproc: in A's queue at once, and A's FD is readable
            await side_a.send(End(node="a"))  # full: reads EVENTS (draining the FD) before it first yields
    assert received == [End(node="b"), *[End(node="fill")] * queued, End(node="a")]
