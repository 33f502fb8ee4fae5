"""Runs a pipeline graph across OS processes: nodes placed `process` or `process:NAME` run in worker processes
(`sagellm.runtime.executor.worker`), the rest as trio tasks here, every cross-process edge a ZeroMQ link.

The parent starts the workers, waits for each one's Ready (its models loaded, its socket bound), sends every worker
the map of endpoints, then runs its own nodes. Workers heartbeat their engine stats (route and pd_split here read
them) and the requests they hold. A worker that exits without saying `End`, or falls silent, is lost: its engines
turn unhealthy, its edges are ended on its behalf (so nothing waits on it), and every request it held, or was sent
since its last heartbeat, ends with an `instance_lost` error. Never a hang."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import structlog
import trio
import zmq

from sagellm.messages import RequestError
from sagellm.runtime.comm import wire
from sagellm.runtime.comm.zmq_trio import PeerMonitor, bind_pull, connect_push
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.executor.bridge import MAIN, Bridge, groups_of
from sagellm.runtime.executor.local import LocalExecutor, PipelineResult
from sagellm.runtime.executor.run import single_errors
from sagellm.runtime.executor.worker import HEARTBEAT_S, REQUESTS_KEY
from sagellm.runtime.pipeline.yaml_io import dump_pipeline

log = structlog.get_logger("sagellm.process_executor")


class WorkerStartError(RuntimeError):
    """A worker process failed before it was ready (its log, on stderr, says why)."""


class ProcessExecutor:
    def __init__(
        self,
        graph: Graph,
        *,
        peer_timeout_s: float = 10.0,
        startup_timeout_s: float = 900.0,
        exit_timeout_s: float = 30.0,
        **local_args: Any,
    ) -> None:
        self.graph = graph
        self.groups = groups_of(graph)
        self.children = sorted({g for g in self.groups.values() if g != MAIN})
        self.executor = LocalExecutor(graph, nodes=[n for n, g in self.groups.items() if g == MAIN], **local_args)
        self.peer_timeout_s = peer_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.processes: dict[str, trio.Process] = {}
        self.pids: dict[str, int] = {}
        self._finished: set[str] = set()  # workers that said End
        self._lost: set[str] = set()
        self._held: dict[str, set[str]] = {g: set() for g in self.children}  # from each worker's last heartbeat
        self._sent: dict[str, dict[str, float]] = {g: {} for g in self.children}  # request -> when sent there
        self._last_heartbeat: dict[str, float] = {}
        self._inject: trio.MemorySendChannel | None = None
        self.executor.on_terminal = lambda item: self._forget(item.request_id)

    async def run(self) -> PipelineResult:
        with single_errors():  # one failure (a worker that did not start): raised as itself
            return await self._run()

    async def _run(self) -> PipelineResult:
        zctx = zmq.Context()
        transport = self.graph.attrs.get("transport", "ipc")
        data, data_endpoint = bind_pull(zctx, transport, MAIN)
        control, control_endpoint = bind_pull(zctx, transport, "control")
        bridge = Bridge(self.executor, MAIN, zctx)
        self.bridge = bridge
        try:
            with tempfile.TemporaryDirectory(prefix="sagellm-graph-") as tmp:
                graph_file = Path(tmp) / "graph.yaml"
                graph_file.write_text(dump_pipeline(self.graph))
                async with trio.open_nursery() as nursery:
                    for group in self.children:
                        await self._spawn(nursery, group, graph_file, control_endpoint)
                    await self.executor.open_operators()
                    endpoints = await self._await_ready(control)
                    peers = {**endpoints, MAIN: data_endpoint}
                    bridge.connect(peers)
                    for group in self.children:  # every worker gets a push, also those only fed by others
                        if group not in bridge.pushes:
                            bridge.pushes[group] = connect_push(zctx, endpoints[group])
                        await bridge.pushes[group].send(wire.Ready(node=MAIN, pid=os.getpid(), info={"peers": peers}))
                    monitor = PeerMonitor(self.peer_timeout_s)
                    for group in self.children:
                        monitor.seen(group)
                    nursery.start_soon(self._control_loop, control, monitor)
                    nursery.start_soon(monitor.watch, lambda g: self._lose(nursery, g, "stopped heartbeating"))
                    bridge.nursery = nursery
                    bridge.before_send = self._before_send
                    bridge.open_inbound()
                    self._open_injection()
                    nursery.start_soon(self._receive, data)
                    result = await self.executor.run()
                    await self._await_exit()
                    nursery.cancel_scope.cancel()
        finally:
            for process in self.processes.values():
                if process.returncode is None:
                    process.kill()
            bridge.close()
            data.close()
            control.close()
            zctx.term()
        return result

    # -- workers --------------------------------------------------------------------------------------------------
    async def _spawn(self, nursery: trio.Nursery, group: str, graph_file: Path, control: str) -> None:
        command = [sys.executable, "-m", "sagellm.runtime.executor.worker"]
        command += ["--graph", str(graph_file), "--group", group, "--control", control]
        process = await trio.lowlevel.open_process(command, stdin=subprocess.DEVNULL)
        self.processes[group], self.pids[group] = process, process.pid
        nursery.start_soon(self._watch_exit, nursery, group, process)

    async def _watch_exit(self, nursery: trio.Nursery, group: str, process: trio.Process) -> None:
        code = await process.wait()
        if group not in self._finished:
            self._lose(nursery, group, f"exited with code {code}")

    async def _await_ready(self, control: Any) -> dict[str, str]:
        """Each worker's endpoint, once it is ready; a worker that dies first fails the start at once."""
        endpoints: dict[str, str] = {}
        deadline = trio.current_time() + self.startup_timeout_s
        while len(endpoints) < len(self.children):
            if self._lost:
                raise WorkerStartError(f"{self.executor.unfinished_error[1]} before it was ready (its log is above)")
            if trio.current_time() > deadline:
                missing = sorted(set(self.children) - set(endpoints))
                raise WorkerStartError(f"workers {missing} were not ready after {self.startup_timeout_s:.0f} s")
            with trio.move_on_after(0.25):
                message = await control.receive()
                if isinstance(message, wire.Ready):
                    endpoints[message.node] = message.info["endpoint"]
                    log.info("worker_ready", group=message.node, pid=message.pid)
        return endpoints

    async def _control_loop(self, control: Any, monitor: PeerMonitor) -> None:
        while True:
            message = await control.receive()
            if isinstance(message, wire.Heartbeat):
                monitor.seen(message.node)
                self._last_heartbeat[message.node] = trio.current_time()
                stats = dict(message.stats)
                self._held[message.node] = set(stats.pop(REQUESTS_KEY, {}).get("ids", ()))
                self._fail_passed_on(message.node)
                for name, fields in stats.items():
                    instance = self.executor.instances.get(name)
                    if instance is not None and message.node not in self._lost:
                        for key, value in fields.items():
                            setattr(instance, key, value)
            elif isinstance(message, wire.End):
                self._finished.add(message.node)
                monitor.forget(message.node)

    async def _await_exit(self) -> None:
        with trio.move_on_after(self.exit_timeout_s):
            for process in self.processes.values():
                await process.wait()

    # -- losing a worker ------------------------------------------------------------------------------------------
    def _lose(self, nursery: trio.Nursery, group: str, why: str) -> None:
        if group in self._lost or group in self._finished:
            return
        self._lost.add(group)
        log.error("worker_lost", group=group, pid=self.pids.get(group), why=why)
        self.executor.unfinished_error = ("instance_lost", f"worker process {group!r} {why}")
        for node, g in self.groups.items():
            if g == group and node in self.executor.instances:
                self.executor.instances[node].healthy = False
        grace = 2 * HEARTBEAT_S
        since = self._last_heartbeat.get(group, -float("inf")) - grace
        doomed = self._held[group] | {rid for rid, t in self._sent[group].items() if t >= since}
        message = f"worker process {group!r} (pid {self.pids.get(group)}) {why}"
        for rid in sorted(doomed):
            self._fail(rid, message)
        self.bridge.close_inbound_from(group)
        for src, dst in self.bridge.cross_edges():
            if self.groups[src] == group and self.groups[dst] not in (MAIN, group):
                nursery.start_soon(self.bridge.send_end_for, src, dst)
        self._close_injection_if_done()

    def _fail_passed_on(self, group: str) -> None:
        """Requests this worker passed on toward a lost worker are lost too: its heartbeat no longer holds them."""
        if group in self._lost or not any(lost in self._downstream(group) for lost in self._lost):
            return
        for rid in [rid for rid in self._sent[group] if rid not in self._held[group]]:
            self._fail(rid, f"it was passed on from {group!r} toward a lost worker {sorted(self._lost)}")

    def _downstream(self, group: str) -> set[str]:
        """Worker groups reachable from `group` along the graph's edges."""
        seen, frontier = set(), [group]
        while frontier:
            g = frontier.pop()
            for src, dst in self.bridge.cross_edges():
                nxt = self.groups[dst]
                if self.groups[src] == g and nxt not in seen and nxt != MAIN:
                    seen.add(nxt)
                    frontier.append(nxt)
        return seen

    def _before_send(self, target: str, item: Any) -> bool:
        """Items for a lost worker end as errors here instead of waiting on its socket."""
        if item is None:
            return target not in self._lost
        rid = getattr(item, "request_id", None)
        if target in self._lost:
            if rid is not None:
                self._fail(rid, f"worker process {target!r} is gone")
            return False
        if rid is not None:
            self._sent[target][rid] = trio.current_time()
        return True

    def _fail(self, rid: str, message: str) -> None:
        self._forget(rid)
        error = RequestError(request_id=rid, code="instance_lost", message=message, retryable=True)
        if self._inject is not None:
            try:
                self._inject.send_nowait(error)
                return
            except (trio.WouldBlock, trio.ClosedResourceError):
                pass
        self.executor.deliver_terminal(error)

    def _forget(self, rid: str) -> None:
        """The request ended (or is being failed): nothing to fail for it any more."""
        for held in self._held.values():
            held.discard(rid)
        for sent in self._sent.values():
            sent.pop(rid, None)

    # -- errors into the graph ------------------------------------------------------------------------------------
    def _open_injection(self) -> None:
        """Errors for lost requests enter where the workers' outputs enter this process, so the sinks see them."""
        targets = [dst for src, dst in self.bridge.cross_edges() if self.groups[dst] == MAIN]
        if targets:
            send, recv = trio.open_memory_channel(float("inf"))
            self._inject = send
            self.bridge.nursery.start_soon(self._pump_injection, recv, self.executor.inbox(targets[0]))

    async def _pump_injection(self, recv: trio.MemoryReceiveChannel, inbox: trio.MemorySendChannel) -> None:
        async with recv, inbox:
            async for item in recv:
                await inbox.send(item)

    def _close_injection_if_done(self) -> None:
        if self._inject is not None and not self.bridge.inbound:
            self._inject.close()

    async def _receive(self, data: Any) -> None:
        await self.bridge.receive_loop(data)
        self._close_injection_if_done()
