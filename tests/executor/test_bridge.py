"""A process's end of the edges that cross processes, over a real ZeroMQ socket pair: an item that cannot be encoded
fails its own request and the edge carries on."""

from __future__ import annotations

import trio
import zmq

from sagellm.runtime.comm import wire
from sagellm.runtime.comm.zmq_trio import bind_pull
from sagellm.runtime.executor.bridge import Bridge
from sagellm.runtime.executor.local import LocalExecutor
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.yaml_io import load_pipeline

GRAPH = """
nodes:
  src: {op: prompt_source}
  out: {op: stdout_sink, placement: "process:w"}
edges:
  - src -> out
"""


async def test_an_item_that_cannot_be_encoded_fails_its_request_alone() -> None:
    executor = LocalExecutor(load_pipeline(GRAPH), nodes=["src"])
    zctx = zmq.Context()
    pull, endpoint = bind_pull(zctx, "ipc", "w")
    bridge = Bridge(executor, "main", zctx)
    try:
        bridge.connect({"w": endpoint})
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                bridge.nursery = nursery
                send = bridge.sender("src", "out")
                async with send:
                    await send.send(Request(request_id="bad", prompt="hi", priority=10**30))  # wider than msgpack
                    await send.send(Request(request_id="good", prompt="hi"))
                received = [await pull.receive_frames() for _ in range(2)]  # [dst, src, *wire frames] each
    finally:
        bridge.close()
        pull.close()
        zctx.term()
    messages = [wire.decode(frames[2:]) for frames in received]
    assert [type(m).__name__ for m in messages] == ["Request", "End"] and messages[0].request_id == "good"
    bad = executor.ledger.outcomes["bad"].error
    assert bad.code == "internal" and "cannot send the request to 'out'" in bad.message
