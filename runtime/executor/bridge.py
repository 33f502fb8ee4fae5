"""A process's end of the graph edges that cross processes: ZeroMQ sockets in place of memory channels.

Each process binds one PULL socket that all its cross-process in-edges share. A message on it is
`[dst node, src node, *wire frames]`; an `End` from `src` closes that edge's sender into `dst`'s input, exactly as
closing a memory channel would, so shutdown flows across processes the same way it flows inside one. Each edge
out of the process is a memory channel whose forwarding task pushes items to the destination process's socket (one
PUSH socket per destination process), tensors as zero-copy frames, or through shared memory to a process on this
host (`comm.shared_memory`; the graph setting `shared_memory: false` keeps frames); with the run's `keys` (a secure
run: see `comm.curve`) every PUSH is a CURVE client."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, get_args

import structlog
import trio
import zmq

from sagellm.runtime.comm import shared_memory, wire
from sagellm.runtime.comm.curve import RunKeys
from sagellm.runtime.comm.wire import TensorLost, WireError
from sagellm.runtime.comm.zmq_trio import TrioSocket, connect_push
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.executor.local import LocalExecutor
from sagellm.runtime.pipeline.messages import Message, RequestError
from sagellm.runtime.pipeline.spec import placement_group

log = structlog.get_logger("sagellm.bridge")


def groups_of(graph: Graph) -> dict[str, str]:
    """Node id -> the process group that runs it (spec.MAIN: the process that runs the graph)."""
    return {node.id: placement_group(node.id, node.placement)[1] for node in graph.nodes.values()}


def remote_groups(graph: Graph, kinds: tuple[str, ...] = ("remote", "ray")) -> list[str]:
    """The process groups that run in workers this process does not start, in name order: started by hand
    (`sagellm worker`, kind remote) or by Ray (kind ray)."""
    placements = (placement_group(node.id, node.placement) for node in graph.nodes.values())
    return sorted({group for kind, group in placements if kind in kinds})


class Bridge:
    def __init__(self, executor: LocalExecutor, group: str, zctx: zmq.Context, *, keys: RunKeys | None = None) -> None:
        self.executor = executor
        self.group = group
        self.zctx = zctx
        self.keys = keys
        self.shared_memory: bool = executor.graph.attrs.get("shared_memory", True)
        self.groups = groups_of(executor.graph)
        self.pushes: dict[str, TrioSocket] = {}
        self.endpoints: dict[str, str] = {}  # process group -> the endpoint its PUSH socket is connected to
        self.inbound: dict[tuple[str, str], trio.MemorySendChannel] = {}
        self.deliveries: dict[tuple[str, str], Any] = {}  # the edges of groups that joined later (`hosted.Delivery`)
        self.accepting = False  # such groups may still join: receive while no edge is open
        self.on_inbound_ended: Callable[[], None] | None = None  # the graph's own inbound edges all ended
        self.nursery: trio.Nursery | None = None
        self.before_send: Callable[[str, Any], bool] | None = None  # (dst group, item) -> send it? (False: dropped)
        executor.remote_sender = self.sender

    def cross_edges(self) -> list[tuple[str, str]]:
        return [(e.src, e.dst) for e in self.executor.graph.edges if self.groups[e.src] != self.groups[e.dst]]

    def connect(self, endpoints: dict[str, str]) -> None:
        """PUSH sockets to every process this one sends to; `endpoints` maps process group -> its PULL endpoint."""
        for src, dst in self.cross_edges():
            target = self.groups[dst]
            if self.groups[src] == self.group and target not in self.pushes:
                self.pushes[target] = connect_push(
                    self.zctx, endpoints[target], keys=self.keys, shared_memory=self.shared_memory
                )
                self.endpoints[target] = endpoints[target]

    def repoint(self, endpoints: dict[str, str]) -> None:
        """A lost process was replaced and its successor listens elsewhere: the PUSH socket toward it drops the old
        endpoint (and what was queued for the dead one) and connects to the new one. A send waiting on it goes on
        to the successor."""
        for target, sock in self.pushes.items():
            new = endpoints.get(target, self.endpoints[target])
            if new != self.endpoints[target]:
                with contextlib.suppress(zmq.ZMQError):  # already gone
                    sock.socket.disconnect(self.endpoints[target])
                sock.socket.connect(new)
                if sock.link is not None:
                    sock.link.close(linger_s=0)  # its receiver is gone
                sock.link = shared_memory.link_to(new) if self.shared_memory else None
                self.endpoints[target] = new
                log.info("peer_repointed", group=target, endpoint=new)

    def join_group(self, nodes: dict[str, str], endpoint: str) -> None:
        """A process group that joined the run after it started (`hosted`): its `nodes` (node -> group, this
        process's ends of its edges too) become known here, and a PUSH socket reaches it at `endpoint`."""
        self.groups.update(nodes)
        group = next(g for g in nodes.values() if g != self.group)
        if group in self.pushes:
            self.repoint({group: endpoint})
            return
        self.pushes[group] = connect_push(self.zctx, endpoint, keys=self.keys, shared_memory=self.shared_memory)
        self.endpoints[group] = endpoint

    def leave_group(self, group: str) -> None:
        """The group of `join_group` is gone for good: its socket closes; its edges were ended."""
        self.close_inbound_from(group)
        for node in [node for node, g in self.groups.items() if g == group]:
            del self.groups[node]
        sock = self.pushes.pop(group, None)
        if sock is not None:
            sock.close()
        self.endpoints.pop(group, None)

    def open_inbound(self) -> None:
        """Senders into local inputs for every edge arriving from another process (before the executor wires its
        own edges, which closes the original senders)."""
        for src, dst in self.cross_edges():
            if self.groups[dst] == self.group:
                self.inbound[(src, dst)] = self.executor.inbox(dst)

    def close_inbound_from(self, group: str) -> None:
        """Ends the edges from a process that is gone, as its `End`s would have."""
        for edges in (self.inbound, self.deliveries):
            for (src, dst), send in list(edges.items()):
                if self.groups[src] == group:
                    send.close()
                    del edges[(src, dst)]

    async def receive_loop(self, sock: TrioSocket) -> None:
        """Delivers items from other processes until every inbound edge has ended (and no more may join). A message
        that is not one another process of this graph could have sent (this socket may listen on a network) is logged
        and dropped: no input ends the loop or the process."""
        while self.inbound or self.deliveries or self.accepting:
            frames = await sock.receive_frames()
            try:
                src, dst, message = _parse(frames)
            except Exception as error:  # WireError, a frame that is not UTF-8, or anything else a stranger can send
                log.warning("bad_message_dropped", frames=len(frames), problem=f"{type(error).__name__}: {error}")
                continue
            edges = self.inbound if (src, dst) in self.inbound else self.deliveries
            send = edges.get((src, dst))
            if send is None:
                log.warning("message_on_closed_edge", src=src, dst=dst, message=type(message).__name__)
            elif isinstance(message, wire.End):
                send.close()
                del edges[(src, dst)]
                if edges is self.inbound and not edges and self.on_inbound_ended is not None:
                    self.on_inbound_ended()
            else:
                await send.send(message)

    def sender(self, src: str, dst: str) -> trio.MemorySendChannel:
        """The edge from this process's `src` to `dst` in another process: closing it sends the edge's End."""
        send, recv = trio.open_memory_channel(0)
        assert self.nursery is not None, "Bridge.nursery must be set before the executor runs"
        self.nursery.start_soon(self._forward, src, dst, recv)
        return send

    async def _forward(self, src: str, dst: str, recv: trio.MemoryReceiveChannel) -> None:
        target = self.groups[dst]
        header = [dst.encode(), src.encode()]
        async with recv:
            async for item in recv:
                if self.before_send is None or self.before_send(target, item):
                    try:
                        frames = wire.encode(item, self.pushes[target].link)
                    except (TypeError, ValueError, OverflowError) as error:  # this item's data, not the edge
                        self._fail_unsendable(item, dst, error)
                        continue
                    await self.pushes[target].send_frames(header + frames)
        if self.before_send is None or self.before_send(target, None):
            await self.pushes[target].send_frames(header + wire.encode(wire.End(node=src)))

    async def send_end_for(self, src: str, dst: str) -> None:
        """Sends an edge's `End` on behalf of a lost process, so the receiving process stops waiting on it."""
        target = self.groups[dst]
        if target in self.pushes:
            await self.pushes[target].send_frames([dst.encode(), src.encode(), *wire.encode(wire.End(node=src))])

    def _fail_unsendable(self, item: Any, dst: str, error: Exception) -> None:
        """An item that cannot be encoded ends its own request here; the edge and every other request go on."""
        rid = getattr(item, "request_id", None)
        log.error("unsendable_item", request_id=rid, dst=dst, item=type(item).__name__, error=repr(error))
        if rid is not None:
            message = f"cannot send the request to {dst!r}: {type(error).__name__}: {error}"
            self.executor.ledger.observe(RequestError(request_id=rid, code="internal", message=message))

    def close(self) -> None:
        for sock in self.pushes.values():
            sock.close()
        if self.shared_memory and shared_memory.available():
            shared_memory.sweep()  # what crashed processes of this run (or an earlier one) left


def _parse(frames: list[Any]) -> tuple[str, str, Any]:
    """(src, dst, message) of `[dst node, src node, *wire frames]`; WireError (or UnicodeDecodeError) if it is not."""
    if len(frames) < 3:
        raise WireError(f"a data message has at least 3 frames (dst, src, type), got {len(frames)}")
    dst, src = frames[0].bytes.decode(), frames[1].bytes.decode()
    try:
        message = wire.decode(frames[2:])
    except TensorLost as error:  # its KV is gone (the sender gave up its shared memory): that request fails alone
        rid = getattr(error.message, "request_id", None)
        if rid is None:
            raise
        log.warning("tensor_lost", request_id=rid, src=src, dst=dst, problem=str(error))
        message = RequestError(request_id=rid, code="internal", message=f"KV transfer: {error}")
    if not isinstance(message, (*get_args(Message), wire.End)):
        raise WireError(f"a {type(message).__name__} has no place on a data socket")
    return src, dst, message
