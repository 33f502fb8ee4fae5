"""The task loop of each kind of node the local executor runs (what it does with one item: `operator_calls`).

`LocalExecutor` owns the graph's wiring: which channel feeds which node, where a node's outputs go, when its input
ends. What a node does with what arrives depends only on its operator's kind, so that lives here, one loop per kind,
behind the two things the wiring hands it: a node's input channel and a `send` to its downstream. Step operators'
`step()` runs in a worker thread, and so does `add()`, between two steps, for everything that arrived meanwhile (an
engine's add prepares a request: its constraint's matcher, its bad words' index; none of it may stall the event loop
every stream and /health share), so an engine never sees two threads at once. A Stream operator serves each item in
a task of its own, which a client's cancel cancels."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

from sagellm.common.pulse import Pulse
from sagellm.runtime.executor.ledger import RequestLedger
from sagellm.runtime.executor.operator_calls import apply_operator, serve_item, step_once
from sagellm.runtime.pipeline.messages import Request, TokenDelta
from sagellm.runtime.pipeline.operator import (
    MapOperator,
    Operator,
    QueueOperator,
    SourceOperator,
    StepOperator,
    StreamOperator,
)

log = structlog.get_logger("sagellm.executor")
IDLE_POLL_S = 0.005  # a non-blocking source that had nothing is polled again after this, or when a request ends
GATHER_IDLE_TURNS = 4  # turns with nothing brought before an engine stops gathering: a request takes 2-3

Send = Callable[[str, Any], Awaitable[bool]]  # (node id, item) -> True when the item went into a channel
NodeLoop = Callable[[str, Any, trio.Nursery], Awaitable[None]]  # (node id, its operator, a nursery for helpers)


class NodeTasks:
    """The loops that run the local executor's nodes, one per operator kind (`loop_for`), and the Stream nodes'
    per-request tasks, which a cancel stops (`stop_serving`)."""

    def __init__(
        self,
        ledger: RequestLedger,
        inputs: dict[str, trio.MemoryReceiveChannel],
        send: Send,
        progress: Pulse,
        is_leaf: Callable[[str], bool],
    ) -> None:
        """`inputs`: each task node's input channel (filled in as the executor opens its operators); `send`: sends an
        item on to a node's downstream; `progress` fires whenever a request ends (idle sources wait on it)."""
        self._ledger = ledger
        self._inputs = inputs
        self._send = send
        self._progress = progress
        self._is_leaf = is_leaf
        self._serving: dict[str, dict[str, trio.CancelScope]] = {}  # stream node -> request id -> its task's scope
        self._queues: dict[str, _Queued] = {}  # queue node -> what it holds for the loop that runs it

    def loop_for(self, op: Operator) -> NodeLoop:
        """The loop that runs a node of `op`'s kind until its input ends."""
        loops: dict[type, NodeLoop] = {
            SourceOperator: self._run_source,
            MapOperator: self._run_map,
            QueueOperator: self._run_queue,
            StepOperator: self._run_step,
            StreamOperator: self._run_stream,
        }
        return next(loop for kind, loop in loops.items() if isinstance(op, kind))

    async def map_item(self, node_id: str, op: MapOperator, leaf: bool, item: Any) -> bool:
        """One item through a Map node: in the node's task, or for a chained node in the task that sent it. True
        when something went on through a channel (as the executor's `send`)."""
        if leaf and not self._ledger.observe(item):
            return False
        through_channel = False
        for out in apply_operator(node_id, op, op.execute, item):
            through_channel |= await self._send(node_id, out)
        return through_channel

    def stop_serving(self, request_id: str) -> None:
        """A stream node serving the request, if it was cancelled, stops (its task sends the abort terminal)."""
        if not self._ledger.is_cancelled(request_id):
            return
        for serving in self._serving.values():
            if request_id in serving:
                serving[request_id].cancel()

    def withdraw_queued(self, request_id: str) -> bool:
        """A request waiting in a queue node leaves it now (the node's loop sends its abort terminal); False when
        no queue node here holds it."""
        for queued in self._queues.values():
            if queued.op.withdraw({request_id}):
                queued.withdrawn.append(request_id)
                queued.changed.fire()
                return True
            if queued.sending == request_id:  # popped, and waiting for the engine to take it
                queued.send_scope.cancel()
                return True
        return False

    def served_requests(self) -> list[str]:
        """Request ids the stream nodes are serving now."""
        return [rid for serving in self._serving.values() for rid in serving]

    async def _send_and_yield(self, node_id: str, out: Any) -> None:
        """`send`, then a checkpoint if the item passed no channel (it ended in chained nodes): a loop of sends (a
        source's, a queue's) must still let other tasks run once per item."""
        if not await self._send(node_id, out):
            await trio.lowlevel.checkpoint()

    async def _run_source(self, node_id: str, op: SourceOperator, _: trio.Nursery) -> None:
        while True:
            if op.blocking:
                items = await trio.to_thread.run_sync(op.poll, abandon_on_cancel=True)
            else:
                items = op.poll()
            if items is None:
                return
            if not items and not op.blocking:
                if op.wakes:  # it is woken (`wake_sources()`) when it has items
                    await self._progress.wait()
                else:
                    with trio.move_on_after(IDLE_POLL_S):  # or sooner: a request ended
                        await self._progress.wait()
            for item in items:
                if isinstance(item, Request):  # a failover attempt's first token says nothing of the queue
                    self._ledger.entered(item.request_id, None if item.retry else item.arrival_time)
                await self._send_and_yield(node_id, item)

    async def _run_map(self, node_id: str, op: MapOperator, _: trio.Nursery) -> None:
        leaf = self._is_leaf(node_id)
        async for item in self._inputs[node_id]:
            await self.map_item(node_id, op, leaf, item)

    async def _run_queue(self, node_id: str, op: QueueOperator, nursery: trio.Nursery) -> None:
        """Pushes what arrives, pops while downstream takes; a request whose client left ends here, not when it
        reaches an engine (`withdraw_queued`), and one cancelled before it arrived is not queued."""
        queued = self._queues[node_id] = _Queued(op)
        input_done = False

        async def receive() -> None:
            nonlocal input_done
            async for item in self._inputs[node_id]:
                if isinstance(item, Request) and self._ledger.is_cancelled(item.request_id):
                    queued.withdrawn.append(item.request_id)
                else:
                    for out in apply_operator(node_id, op, op.push, item):
                        await self._send(node_id, out)
                queued.changed.fire()
            input_done = True
            queued.changed.fire()

        nursery.start_soon(receive)
        while True:
            while queued.withdrawn:
                await self._send_abort(node_id, queued.withdrawn.pop())
            item = op.pop()
            if item is not None:
                await self._send_popped(node_id, queued, item)
                continue
            if input_done and not len(op):
                return
            await queued.changed.wait()

    async def _send_popped(self, node_id: str, queued: _Queued, item: Any) -> None:
        """Sends on what the queue popped; a request cancelled while its send waits for room downstream is not
        delivered (a cancelled channel send delivers nothing) and ends here."""
        rid = getattr(item, "request_id", None)
        with trio.CancelScope() as queued.send_scope:
            queued.sending = rid
            through_channel = await self._send(node_id, item)
        queued.sending = None
        if queued.send_scope.cancelled_caught:
            await self._send_abort(node_id, rid)
        elif not through_channel:
            await trio.lowlevel.checkpoint()

    async def _run_step(self, node_id: str, op: StepOperator, nursery: trio.Nursery) -> None:
        """A feeder task takes items while `step()` runs, up to the operator's `capacity()`, so an engine admits a
        whole batch's worth between two steps (not one item per step), and whatever it has no room for stays
        upstream, where a policy queue orders it."""
        buffer: deque[Any] = deque()
        arrived, room = Pulse(), Pulse()
        closed = False

        async def feed() -> None:
            nonlocal closed
            inbox = self._inputs[node_id]
            while True:
                while len(buffer) >= op.capacity():
                    await room.wait()
                try:
                    item = await inbox.receive()
                except trio.EndOfChannel:
                    closed = True
                    arrived.fire()
                    return
                buffer.append(item)
                arrived.fire()

        nursery.start_soon(feed)
        while True:
            await self._gather_routed(node_id, op, buffer)
            if buffer:
                await self._feed(node_id, op, buffer)
                room.fire()  # what was fed left the buffer (and what passed through took no capacity)
            if self._ledger.any_cancelled and await self._end_cancelled(node_id, op):
                room.fire()  # the aborted requests' room: the feeder may wait for it
            if op.has_work():
                outs = step_once(node_id, op) if op.inline else await trio.to_thread.run_sync(step_once, node_id, op)
                room.fire()
                for out in outs:
                    await self._send(node_id, out)
                if op.inline:
                    await trio.lowlevel.checkpoint()
                continue
            if buffer:  # arrived while this loop sent (an abort): its signal had no waiter, so it is fed now
                continue
            if closed:
                return
            await arrived.wait()

    async def _gather_routed(self, node_id: str, op: StepOperator, buffer: deque[Any]) -> None:
        """Before a step: requests already routed to this engine while it was full (blocked in its channel) are
        taken now, and those the queue routes next to the room the last step freed, so a freed slot is filled by the
        next step, not the one after. A request takes a few turns of the event loop (the feeder takes the one
        waiting; the queue pops, routes and sends its next; the feeder takes that; trio runs a turn's tasks in a
        random order): it stops once `GATHER_IDLE_TURNS` turns in a row brought nothing and nothing waits to be sent
        (the queue is empty), or the engine is full. When nothing waits in the channel it costs no turn at all."""
        inbox = self._inputs[node_id]
        if not inbox.statistics().tasks_waiting_send:
            return
        idle = 0
        while len(buffer) < op.capacity() and idle < GATHER_IDLE_TURNS:
            before = len(buffer)
            await trio.lowlevel.checkpoint()
            idle = 0 if len(buffer) > before or inbox.statistics().tasks_waiting_send else idle + 1

    async def _feed(self, node_id: str, op: StepOperator, buffer: deque[Any]) -> None:
        """Hands what the buffer holds to the operator: those whose clients left while they waited upstream are
        aborted, the rest added in one worker thread (on the loop for an `inline` operator). They stay in the
        buffer, counted against the operator's capacity, until they are in."""
        batch = list(buffer)
        left = [rid for item in batch if self._ledger.is_cancelled(rid := getattr(item, "request_id", None))]
        taken = [item for item in batch if getattr(item, "request_id", None) not in left]

        def add() -> list[Any]:
            return [out for item in taken for out in apply_operator(node_id, op, op.add, item)]

        outs = add() if op.inline or not taken else await trio.to_thread.run_sync(add)
        for _ in batch:
            buffer.popleft()
        for rid in left:  # its client left while it waited upstream
            op.abort([rid])  # never held: what a router charged the engine's stats for it is given back
            await self._send_abort(node_id, rid)
        for out in outs:
            await self._send(node_id, out)

    async def _end_cancelled(self, node_id: str, op: StepOperator) -> bool:
        """Aborts the held requests whose clients left; whether there were any."""
        held = [rid for rid in op.in_flight() if self._ledger.is_cancelled(rid)]
        if held:
            op.abort(held)
            for rid in held:
                await self._send_abort(node_id, rid)
        return bool(held)

    async def _run_stream(self, node_id: str, op: StreamOperator, nursery: trio.Nursery) -> None:
        """One task per item, at most `capacity()` at once; the node ends when its input has and every task did."""
        serving = self._serving[node_id] = {}
        room = Pulse()
        try:
            async for item in self._inputs[node_id]:
                if op.accepts and not isinstance(item, op.accepts):
                    await self._send(node_id, item)
                    continue
                rid = item.request_id
                if self._ledger.is_cancelled(rid):  # its client left while it waited upstream
                    await self._send_abort(node_id, rid)
                    continue
                while len(serving) >= op.capacity():
                    await room.wait()
                serving[rid] = trio.CancelScope()
                nursery.start_soon(self._serve_one, node_id, op, item, room)
            while serving:
                await room.wait()
        finally:
            with trio.CancelScope(shield=True):
                await op.drained()

    async def _serve_one(self, node_id: str, op: StreamOperator, item: Any, room: Pulse) -> None:
        """Sends on what `op.serve(item)` yields; a cancelled or failed item still ends with one terminal."""
        rid, serving = item.request_id, self._serving[node_id]
        ended = False
        try:
            with serving[rid]:
                ended = await serve_item(
                    node_id, op, item, lambda out: self._send(node_id, out), lambda: self._ledger.is_cancelled(rid)
                )
            if not ended:  # its client left
                await self._send_abort(node_id, rid)
        finally:
            del serving[rid]
            room.fire()

    async def _send_abort(self, node_id: str, rid: str) -> None:
        self._ledger.aborted(rid)
        await self._send(node_id, TokenDelta(request_id=rid, token_ids=[], finish_reason="abort"))


class _Queued:
    """A queue node's operator, the cancelled requests it let go whose abort its loop has yet to send, and the request
    it is sending on."""

    def __init__(self, op: QueueOperator) -> None:
        self.op = op
        self.withdrawn: list[str] = []
        self.changed = Pulse()
        self.sending: str | None = None  # the request popped and being sent on (its send may wait for room)
        self.send_scope = trio.CancelScope()
