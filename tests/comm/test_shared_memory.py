"""Shared memory between processes on one host (`runtime.comm.shared_memory`): a KV sent by another process over a
real ipc:// ZeroMQ link arrives byte for byte with only a handle on the wire; nothing is left in /dev/shm afterwards,
even when the receiver is killed before reading or dies holding the KV; a handle that cannot be had fails its own
message with a clear WireError; links to other hosts keep ZeroMQ frames."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from multiprocessing.connection import Connection

import numpy as np
import pytest
import torch
import trio
import zmq

from sagellm.runtime.comm import shared_memory
from sagellm.runtime.comm.shared_memory import HEADER, MAGIC, PREFIX, Arena, Handle, Mappings, is_local, link_to
from sagellm.runtime.comm.wire import TensorLost, decode, encode
from sagellm.runtime.comm.zmq_trio import bind_pull, connect_push
from sagellm.runtime.executor.bridge import Bridge, _parse
from sagellm.runtime.executor.local import LocalExecutor
from sagellm.runtime.pipeline.messages import KVBlocks, PrefillDone, Request, RequestError
from sagellm.runtime.pipeline.yaml_io import load_pipeline

pytestmark = pytest.mark.skipif(not shared_memory.available(), reason="needs /dev/shm")
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def kv_of(seed: int, tokens: int = 64) -> torch.Tensor:
    return torch.randn((30, 2, tokens, 3, 64), generator=torch.Generator().manual_seed(seed))  # [L, 2, T, H, D]


def prefill_done(rid: str, kv: torch.Tensor) -> PrefillDone:
    return PrefillDone(
        request_id=rid, request=Request(request_id=rid), first_token=1, first_token_time=0.0,
        kv=KVBlocks(num_tokens=kv.shape[2], data=kv),
    )  # fmt: skip


def left_by(pid: int) -> list[str]:
    return [name for name in os.listdir(shared_memory.SHM_DIR) if name.startswith(f"{PREFIX}{pid}-")]


def sender_main(endpoint: str, tokens: list[int], conn: Connection) -> None:
    """Another process: sends one KV per entry of `tokens` through shared memory, reports its segments, waits."""

    async def main() -> None:
        with connect_push(ctx, endpoint, shared_memory=True) as push:
            for i, n in enumerate(tokens):
                await push.send(prefill_done(f"r{i}", kv_of(i, n)))
            conn.send([slot.name for slot in shared_memory.arena().slots])
            await trio.to_thread.run_sync(conn.recv)  # the receiver has checked: close

    ctx = zmq.Context()
    trio.run(main)
    ctx.term()


def receiver_main(reads: int, conn: Connection) -> None:
    """Another process: binds a PULL, reports its endpoint, keeps the first `reads` KVs it receives, then idles
    until killed."""

    async def main() -> None:
        pull, endpoint = bind_pull(ctx, "ipc", "kv-receiver")
        conn.send(endpoint)
        kept = [await pull.receive() for _ in range(reads)]
        conn.send(len(kept))
        await trio.sleep_forever()

    ctx = zmq.Context()
    trio.run(main)


@pytest.mark.slow
async def test_kv_crosses_processes_through_shared_memory_byte_for_byte(ctx: zmq.Context) -> None:
    pull, endpoint = bind_pull(ctx, "ipc", "kv-decode")
    mine, theirs = SPAWN.Pipe()
    sender = SPAWN.Process(target=sender_main, args=(endpoint, [64, 64, 128], theirs), daemon=True)
    sender.start()
    try:
        with pull, trio.fail_after(60):
            received = []
            for _ in range(3):
                frames = await pull.receive_frames()
                assert len(frames) == 2  # type and struct: the KV's bytes are not on the wire
                received.append(decode(frames))
            names = await trio.to_thread.run_sync(mine.recv)
            for i, message in enumerate(received):
                assert message.request_id == f"r{i}" and torch.equal(message.kv.data, kv_of(i, message.kv.num_tokens))
            assert len(names) == 3 and left_by(sender.pid) == []  # mapped, so unlinked: a crash now leaks nothing
            del received, message
            mine.send("close")
            await trio.to_thread.run_sync(sender.join, 30)
        assert sender.exitcode == 0 and left_by(sender.pid) == []
    finally:
        sender.kill()


@pytest.mark.slow
async def test_a_receiver_killed_before_reading_leaves_nothing(ctx: zmq.Context) -> None:
    mine, theirs = SPAWN.Pipe()
    receiver = SPAWN.Process(target=receiver_main, args=(0, theirs), daemon=True)
    receiver.start()
    arena = Arena()
    try:
        with trio.fail_after(60):
            endpoint = await trio.to_thread.run_sync(mine.recv)
            await trio.to_thread.run_sync(mine.recv)  # it read nothing and never will
            with connect_push(ctx, endpoint) as push:
                push.link = arena.link(endpoint)
                await push.send(prefill_done("r0", kv_of(0)))
                (name,) = [slot.name for slot in arena.slots]
                assert name in left_by(os.getpid())  # on its way: the receiver has not mapped it
                os.kill(receiver.pid, signal.SIGKILL)
                await trio.to_thread.run_sync(receiver.join, 30)
            # closing the link waited its linger for a receiver it never heard of, then removed the name
        assert left_by(os.getpid()) == [] and arena.slots == []
    finally:
        receiver.kill()
        arena.close(linger_s=0)


@pytest.mark.slow
async def test_a_receiver_that_dies_holding_its_kv_frees_the_slot(ctx: zmq.Context) -> None:
    mine, theirs = SPAWN.Pipe()
    receiver = SPAWN.Process(target=receiver_main, args=(1, theirs), daemon=True)
    receiver.start()
    arena = Arena()
    try:
        with trio.fail_after(60):
            endpoint = await trio.to_thread.run_sync(mine.recv)
            with connect_push(ctx, endpoint) as push:
                push.link = arena.link(endpoint)
                await push.send(prefill_done("r0", kv_of(0)))
                assert await trio.to_thread.run_sync(mine.recv) == 1
                (slot,) = arena.slots
                assert not slot.free() and left_by(os.getpid()) == []  # mapped and held by the receiver
                os.kill(receiver.pid, signal.SIGKILL)
                await trio.to_thread.run_sync(receiver.join, 30)
                assert arena.share(kv_of(1), endpoint) is not None
                assert slot not in arena.slots  # its release would never come: given up
                push.link = None
        arena.close(linger_s=0)  # the second KV was never sent, and its receiver is dead: no waiting
        assert left_by(os.getpid()) == [] and arena.slots == []
    finally:
        receiver.kill()
        arena.close(linger_s=0)


@pytest.fixture
def arena() -> Iterator[Arena]:
    arena = Arena()
    yield arena
    arena.close(linger_s=0)


def test_a_released_slot_is_filled_again_and_a_tensor_already_there_is_not_copied(arena: Arena) -> None:
    receiving = Mappings()
    first = arena.share(kv_of(0), "peer")
    assert first is not None and torch.equal(receiving.tensor(first), kv_of(0))  # released as the tensor died
    second = arena.share(kv_of(1), "peer")
    assert second.segment == first.segment and second.fill == first.fill + 1 and len(arena.slots) == 1

    kv = arena.empty((30, 2, 64, 3, 64), torch.float32)
    kv.copy_(kv_of(2))
    handle = arena.share(kv, "peer")
    (slot,) = [s for s in arena.slots if s.name == handle.segment]
    assert slot.address + handle.offset == kv.data_ptr()  # the producer's own memory: nothing copied
    assert torch.equal(receiving.tensor(handle), kv_of(2))


def test_a_tensor_with_no_room_in_shared_memory_goes_as_a_frame() -> None:
    arena = Arena(max_bytes=1 << 20)
    frames = encode(prefill_done("r0", kv_of(0)), arena.link("peer"))  # 2.9 MB > 1 MiB
    assert len(frames) == 3 and arena.slots == []
    assert torch.equal(decode(frames).kv.data, kv_of(0))


def test_a_handle_that_cannot_be_had_fails_its_message_clearly(arena: Arena) -> None:
    receiving = Mappings()
    small = arena.share(torch.zeros(4), "peer")
    gone = Handle(f"{PREFIX}{os.getpid()}-999-0123abcd", 1, 0, "float32", [4])
    too_big = Handle(small.segment, small.fill, 0, "float32", [1 << 20])
    problems = {
        "no longer exists": gone,
        "holds 1048576 bytes; a float32 tensor of shape [1048576] at offset 0 needs 4194304": too_big,
        "is stale": Handle(small.segment, small.fill + 1, 0, "float32", [4]),
        "not the name of a sageLLM": Handle("../../etc/passwd", 1, 0, "float32", [4]),
    }
    for problem, handle in problems.items():
        with pytest.raises(shared_memory.SegmentError, match=re.escape(problem)):
            receiving.tensor(handle)

    class Deliver:  # a link that hands over a handle to a segment that is gone
        def share(self, tensor: torch.Tensor) -> Handle:
            return gone

    frames = encode(prefill_done("r7", kv_of(0)), Deliver())
    with pytest.raises(TensorLost, match="no longer exists") as lost:
        decode(frames)
    assert lost.value.message.request_id == "r7"
    src, dst, item = _parse([zmq.Frame(b"decode"), zmq.Frame(b"prefill"), *map(zmq.Frame, frames)])
    assert (src, dst) == ("prefill", "decode") and isinstance(item, RequestError)
    assert item.request_id == "r7" and item.code == "internal" and "no longer exists" in item.message


def own_address() -> str:
    """This host's address on its default route (a Ray node's address), else loopback when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # nothing is sent: the kernel only picks the source address
        except OSError:
            return "127.0.0.1"
        return probe.getsockname()[0]


def test_links_to_other_hosts_keep_frames(ctx: zmq.Context) -> None:
    local = ["ipc:///tmp/x", "tcp://127.0.0.1:5555", "tcp://localhost:5555", f"tcp://{own_address()}:5555"]
    remote = ["tcp://10.1.2.3:5555", "tcp://node7:5555", "tcp://0.0.0.0:5555"]
    assert all(map(is_local, local)) and not any(map(is_local, remote))
    assert all(link_to(endpoint) is None for endpoint in remote)
    with connect_push(ctx, "tcp://10.255.255.1:5555", shared_memory=True) as push:
        assert push.link is None
    with connect_push(ctx, "ipc:///tmp/sagellm-nobody", shared_memory=False) as push:
        assert push.link is None
    assert len(encode(prefill_done("r0", kv_of(0)), None)) == 3  # the KV as a frame


def test_the_bridge_uses_it_toward_this_host_unless_the_graph_says_no(ctx: zmq.Context) -> None:
    graph = (
        "nodes:\n  src: {op: prompt_source}\n  out: {op: stdout_sink, placement: 'process:w'}\nedges: [src -> out]\n"
    )
    for setting, shared in (("", True), ("shared_memory: false\n", False)):
        bridge = Bridge(LocalExecutor(load_pipeline(setting + graph), nodes=["src"]), "main", ctx)
        bridge.connect({"w": "ipc:///tmp/sagellm-nobody"})
        assert (bridge.pushes["w"].link is not None) == shared
        bridge.repoint({"w": "tcp://10.255.255.1:5555"})  # its successor on another host
        assert bridge.pushes["w"].link is None
        bridge.close()


def test_sweep_removes_what_dead_processes_left_unless_a_live_receiver_waits_for_it() -> None:
    dead = _dead_pid()
    orphan, awaited = f"{PREFIX}{dead}-0-0123abcd", f"{PREFIX}{dead}-1-0123abcd"
    for name, heir in ((orphan, 0), (awaited, os.getpid())):
        words = np.zeros(HEADER // 8, dtype=np.int64)
        words[0], words[5] = MAGIC, heir  # the header's magic and heir words
        with open(os.path.join(shared_memory.SHM_DIR, name), "wb") as file:
            file.write(words.tobytes() + bytes(16))
    try:
        assert orphan in shared_memory.sweep() and left_by(dead) == [awaited]
    finally:
        for name in left_by(dead):
            os.unlink(os.path.join(shared_memory.SHM_DIR, name))


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid
