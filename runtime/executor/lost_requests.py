"""Which worker may hold which request, so that every request a lost worker held ends with an `instance_lost` error
(never a hang), and those errors enter the graph where the workers' outputs enter this process, so the sinks see them.

A request is counted where it was sent (this process's sends toward each worker) and where it is held (each worker's
heartbeat lists its requests). When a worker is lost, what it may have held is failed once the live workers have
heartbeated again, so a request it had just handed on, which the next worker by then reports, goes on."""

from __future__ import annotations

from collections.abc import Callable

import trio

from sagellm.runtime.comm import wire
from sagellm.runtime.executor.bridge import Bridge
from sagellm.runtime.executor.local import LocalExecutor
from sagellm.runtime.pipeline.messages import RequestError
from sagellm.runtime.pipeline.spec import MAIN


class LostRequests:
    def __init__(self, executor: LocalExecutor, groups: dict[str, str], lost: set[str]) -> None:
        """`groups`: node -> its process group; `lost`: the groups whose worker is lost now (the executor's set)."""
        self.executor, self.groups, self.lost = executor, groups, lost
        children = sorted({g for g in groups.values() if g != MAIN})
        self.held: dict[str, set[str]] = {g: set() for g in children}  # from each worker's last heartbeat
        self.sent: dict[str, set[str]] = {g: set() for g in children}  # requests sent there, not yet ended
        self.bridge: Bridge | None = None  # the run's links, once they exist
        self._inject: trio.MemorySendChannel | None = None
        executor.ledger.on_terminal.append(lambda item: self.forget(item.request_id))

    def heard(self, group: str, held: set[str]) -> None:
        """A worker's heartbeat listed what it holds."""
        if group not in self.lost:  # a restarted worker holds nothing before it rejoins; its predecessor's stay
            self.held[group] = held
        self._fail_passed_on(group)

    def rejoined(self, group: str) -> None:
        """The group's new worker holds nothing yet."""
        self.held[group], self.sent[group] = set(), set()

    async def fail_doomed(self, group: str, message: str, cancel: Callable[[list[str]], None]) -> None:
        """Fails what the lost worker may have held, once the live workers have heartbeated again; `cancel` stops
        any of them that lived on elsewhere after all, freeing its engine's room."""
        await trio.sleep(2 * wire.HEARTBEAT_S)
        doomed = sorted(self._doomed(group))
        for rid in doomed:
            self.fail(rid, message)
        if doomed:
            cancel(doomed)

    def _doomed(self, group: str) -> set[str]:
        """What a lost worker may have held: the requests of its last heartbeat and every request sent to it (one may
        sit unseen in a socket queue while its engine is full), except those a live worker reports holding: they
        moved on (a prefill engine still lists what it handed to decode). One that moved on since the last heartbeats
        may be failed too (its later end is dropped as a duplicate); none is left to hang."""
        elsewhere = set().union(*(held for g, held in self.held.items() if g != group and g not in self.lost))
        return (self.held[group] | self.sent[group]) - elsewhere

    def _fail_passed_on(self, group: str) -> None:
        """Requests this worker passed on toward a lost worker are lost too: its heartbeat no longer holds them."""
        if group in self.lost or not any(lost in self._downstream(group) for lost in self.lost):
            return
        for rid in sorted(self.sent[group] - self.held[group]):
            self.fail(rid, f"it was passed on from {group!r} toward a lost worker {sorted(self.lost)}")

    def _downstream(self, group: str) -> set[str]:
        """Worker groups reachable from `group` along the graph's edges."""
        assert self.bridge is not None
        seen, frontier = set(), [group]
        while frontier:
            g = frontier.pop()
            for src, dst in self.bridge.cross_edges():
                nxt = self.groups[dst]
                if self.groups[src] == g and nxt not in seen and nxt != MAIN:
                    seen.add(nxt)
                    frontier.append(nxt)
        return seen

    def sending(self, target: str, rid: str | None, describe: Callable[[str], str]) -> bool:
        """An item for `target` is about to be sent: False (and the request failed here) when that worker is lost."""
        if target in self.lost:
            if rid is not None:
                self.fail(rid, f"{describe(target)} is gone")
            return False
        if rid is not None:
            self.sent[target].add(rid)
        return True

    def fail(self, rid: str, message: str) -> None:
        self.forget(rid)
        error = RequestError(request_id=rid, code="instance_lost", message=message, retryable=True)
        if self._inject is not None:
            try:
                self._inject.send_nowait(error)
                return
            except (trio.WouldBlock, trio.ClosedResourceError):
                pass
        self.executor.ledger.observe(error)  # its path through the graph is gone

    def forget(self, rid: str) -> None:
        """The request ended (or is being failed): nothing to fail for it any more."""
        for held in self.held.values():
            held.discard(rid)
        for sent in self.sent.values():
            sent.discard(rid)

    # -- errors into the graph ------------------------------------------------------------------------------------
    def open_injection(self) -> None:
        """Errors for lost requests enter where the workers' outputs enter this process (the bridge runs now), at an
        entry after which no worker runs: the injection ends only once every worker's output has, so a node that
        feeds workers (pd_split after an `encode` worker) would wait on itself."""
        bridge = self.bridge
        assert bridge is not None
        targets = [dst for src, dst in bridge.cross_edges() if self.groups[dst] == MAIN]
        last = [dst for dst in targets if all(self.groups[n] == MAIN for n in self._after(dst))]
        if targets:
            send, recv = trio.open_memory_channel(float("inf"))
            self._inject = send
            bridge.nursery.start_soon(self._pump_injection, recv, self.executor.inbox((last or targets)[0]))

    def _after(self, node: str) -> set[str]:
        """The nodes downstream of `node` along the graph's edges."""
        edges = self.executor.graph.edges
        seen, frontier = set(), [node]
        while frontier:
            at = frontier.pop()
            for e in edges:
                if e.src == at and e.dst not in seen:
                    seen.add(e.dst)
                    frontier.append(e.dst)
        return seen

    async def _pump_injection(self, recv: trio.MemoryReceiveChannel, inbox: trio.MemorySendChannel) -> None:
        async with recv, inbox:
            async for item in recv:
                await inbox.send(item)

    def close_injection_if_done(self) -> None:
        """Once nothing more comes in from the workers, no error for a lost request can follow either."""
        if self._inject is not None and self.bridge is not None and not self.bridge.inbound:
            self._inject.close()
