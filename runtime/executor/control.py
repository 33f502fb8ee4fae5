"""The parent's end of the control channel to its workers: one ROUTER socket, the only address a worker must know.

Every worker, spawned by the parent or started by hand on another host (`sagellm worker --connect ENDPOINT
--group NAME`), joins the same way:

    worker -> Hello(group, pid, host, protocol)     parent -> Assign(graph YAML, peer timeout) or Assign(error)
    worker -> Ready(endpoint of its data socket)    parent -> Ready(every group's endpoint), once all are ready
    both   -> Heartbeat every HEARTBEAT_S           (worker heartbeats carry its engine stats and held requests)
    worker -> End: it finished                      parent -> End: stop now (the run ended, or gave the worker up)
    worker -> End(error, kind): it failed, and why  parent -> End (it heard; it gives the worker up)
                                                    parent -> Cancel(request ids): their clients left
                                                    parent -> Sleep(level): its engines sleep (0: they wake)
                                                    parent -> Ready(every group's endpoint) again, to the others,
                                                              when a lost worker's successor is ready elsewhere

The graph travels as text so the worker's host needs no copy of the file. A Hello is refused, with a reason the
worker prints, for a group the graph does not place by hand, a group that already has a worker, or another wire
protocol (another sageLLM version). Messages from anyone who has not joined are ignored, and a malformed message
is logged and dropped: this socket may listen on a network."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import structlog
import trio

from sagellm.common.peer_monitor import PeerMonitor
from sagellm.common.pulse import Pulse
from sagellm.runtime.comm import wire
from sagellm.runtime.comm.zmq_trio import TrioSocket
from sagellm.runtime.pipeline.spec import MAIN

log = structlog.get_logger("sagellm.control")


@dataclass
class Worker:
    """A worker that joined: where to send to it, and who it is (for logs and errors)."""

    identity: bytes  # its ZeroMQ routing id on the control socket
    pid: int
    host: str


class ControlServer:
    def __init__(
        self,
        sock: TrioSocket,
        graph_text: str,
        *,
        spawned: dict[str, int],
        remote: list[str],
        peer_timeout_s: float,
    ) -> None:
        """`spawned`: group -> pid of the workers the parent starts (filled as it starts them); `remote`: the groups
        whose workers are started by hand."""
        self.sock = sock
        self.graph_text = graph_text
        self.graph_texts: dict[str, str] = {}  # group -> the graph its worker runs, when not the run's (`hosted`)
        self.spawned = spawned
        self.remote = remote
        self.peer_timeout_s = peer_timeout_s
        self.monitor = PeerMonitor(peer_timeout_s)
        self.workers: dict[str, Worker] = {}  # groups that joined
        self.endpoints: dict[str, str] = {}  # group -> its data endpoint, once Ready
        self.gone: set[str] = set()  # groups that said End or were given up: no more heartbeats, messages ignored
        self._changed = Pulse()

    def name(self, group: str) -> str:
        """`worker process 'decode'` (started here) or `remote worker 'decode'` (started by hand)."""
        return f"remote worker {group!r}" if group in self.remote else f"worker process {group!r}"

    def describe(self, group: str) -> str:
        """The name with who runs it: `worker process 'decode' (pid 12)`, `remote worker 'decode' (pid 12 on h)`."""
        worker = self.workers.get(group)
        if group in self.remote:
            return self.name(group) + (f" (pid {worker.pid} on {worker.host})" if worker else "")
        return f"{self.name(group)} (pid {self.spawned.get(group)})"

    async def wait_changed(self) -> None:
        """Until a worker joins, becomes ready, heartbeats (its stats applied), ends or is given up."""
        await self._changed.wait()

    # -- receiving ------------------------------------------------------------------------------------------------
    async def serve(
        self, on_heartbeat: Callable[[str, wire.Heartbeat], None], on_end: Callable[[str, wire.End], None]
    ) -> NoReturn:
        """Answers Hellos and records Ready; hands heartbeats and Ends of joined workers on, until cancelled. A worker
        that finished (End) is gone from here on; one that failed (End with an error) is the parent's to give up.

        A worker is watched for silence only once it is ready: while it loads its model a loaded machine can starve
        its heartbeats for longer than the peer timeout (a Ray start failed so, once in three), and until then its
        process's exit and the start's deadline are what judge it."""
        while True:
            frames = await self.sock.receive_frames()
            try:
                message = wire.decode(frames[1:])
            except wire.WireError as error:
                log.warning("control_message_dropped", problem=str(error))
                continue
            identity = frames[0].bytes
            if isinstance(message, wire.Hello):
                await self._hello(identity, message)
                continue
            group = getattr(message, "node", None)
            worker = self.workers.get(group)
            if worker is None or worker.identity != identity or group in self.gone:
                log.debug("control_message_ignored", group=group, message=type(message).__name__)
                continue
            if group in self.endpoints or isinstance(message, wire.Ready):
                self.monitor.seen(group)  # watched for silence once ready (`serve`'s docstring says why)
            if isinstance(message, wire.Ready):
                self.endpoints[group] = message.info["endpoint"]
                log.info("worker_ready", worker=self.describe(group), endpoint=self.endpoints[group])
            elif isinstance(message, wire.Heartbeat):
                on_heartbeat(group, message)
            elif isinstance(message, wire.End):
                if not message.error:
                    self.monitor.forget(group)
                    self.gone.add(group)
                on_end(group, message)
            self._changed.fire()

    async def _hello(self, identity: bytes, hello: wire.Hello) -> None:
        problem = self._refusal(hello)
        if problem is not None:
            log.warning("worker_refused", group=hello.node, pid=hello.pid, host=hello.host, problem=problem)
            await self._send(identity, wire.Assign(error=problem))
            return
        self.workers[hello.node] = Worker(identity, hello.pid, hello.host)
        log.info("worker_joined", worker=self.describe(hello.node))
        graph = self.graph_texts.get(hello.node, self.graph_text)
        await self._send(identity, wire.Assign(graph=graph, peer_timeout_s=self.peer_timeout_s))
        self._changed.fire()

    def _refusal(self, hello: wire.Hello) -> str | None:
        group = hello.node
        if hello.protocol != wire.PROTOCOL:
            return (
                f"the worker speaks wire protocol {hello.protocol}, this run {wire.PROTOCOL}: "
                "install the same sageLLM version on both hosts"
            )
        if group in self.spawned:
            if hello.pid != self.spawned[group]:  # not the worker the parent started for it
                return f"group {group!r} is placed 'process': the graph starts its worker itself (or: remote:{group})"
        elif group not in self.remote:
            groups = ", ".join(self.remote) or "none"
            return f"the graph has no group {group!r} for a worker started by hand; its remote groups: {groups}"
        if group in self.workers:
            return f"group {group!r} already has a worker: {self.describe(group)}"
        return None

    def reopen(self, group: str) -> None:
        """The group of a lost worker takes a new one (a restart): its Hello is accepted as a first one was, and
        anything the old worker still sends is ignored."""
        self.workers.pop(group, None)
        self.endpoints.pop(group, None)
        self.gone.discard(group)
        self.monitor.forget(group)

    def forget(self, group: str) -> None:
        """A group that joined at run time (`hosted`) is gone for good: nothing of it is kept."""
        self.end(group)
        self.reopen(group)
        self.graph_texts.pop(group, None)
        self.spawned.pop(group, None)

    # -- sending --------------------------------------------------------------------------------------------------
    async def start_all(self, peers: dict[str, str]) -> None:
        """Sends every worker the endpoints of all groups: the go to connect its edges and run (again after a restart:
        the new worker's go, and where the others now reach it)."""
        message = wire.Ready(node=MAIN, pid=os.getpid(), info={"peers": peers})
        for group, worker in list(self.workers.items()):
            if group not in self.gone:
                await self._send(worker.identity, message)

    async def heartbeat_loop(self) -> NoReturn:
        """Tells the workers the parent is alive (a worker that stops hearing it exits), until cancelled."""
        while True:
            for group, worker in list(self.workers.items()):
                if group not in self.gone:
                    await self._send(worker.identity, wire.Heartbeat(node=MAIN, time=time.time()))
            await trio.sleep(wire.HEARTBEAT_S)

    def cancel(self, request_ids: list[str], group_only: str | None = None) -> None:
        """Tells every worker (or `group_only`'s) that these requests' clients left (whichever holds one aborts it)."""
        for group, worker in self.workers.items():
            if group not in self.gone and group_only in (None, group):
                self._send_now(worker.identity, wire.Cancel(node=MAIN, request_ids=request_ids))

    def sleep(self, group: str, level: int) -> None:
        """Tells a worker to put its engines to sleep at `level` (0: wake them); its heartbeats say when they did."""
        worker = self.workers.get(group)
        if worker is not None and group not in self.gone:
            self._send_now(worker.identity, wire.Sleep(node=MAIN, level=level))

    def end(self, group: str) -> None:
        """Gives a worker up: tells it to stop (it may be alive behind a stall or a partition) and ignores it."""
        self.monitor.forget(group)
        self.gone.add(group)
        if group in self.workers:
            self._send_now(self.workers[group].identity, wire.End(node=MAIN))
        self._changed.fire()

    def end_all(self) -> None:
        """The run is over: every worker still there stops (also from a `finally`, so it never waits)."""
        for group in self.workers:
            if group not in self.gone:
                self.end(group)

    async def _send(self, identity: bytes, message: Any) -> None:
        # A ROUTER never waits: a message to a peer that is gone or whose queue is full is dropped.
        await self.sock.send_frames([identity, *wire.encode(message)])

    def _send_now(self, identity: bytes, message: Any) -> None:
        if not self.sock.send_now([identity, *wire.encode(message)]):  # a closed socket, or a full queue
            log.debug("control_send_dropped", message=type(message).__name__)
