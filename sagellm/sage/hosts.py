"""The threads a SAGE job keeps beside SAGE's own: an engine that steps while SAGE dispatches, a server's streams
served on a trio loop of their own, and a blocking source polled off SAGE's loop.

SAGE's local runtime dispatches every item synchronously, from one loop that polls the sources in turn. An engine
stepped inside that loop would hold every other node still for the length of a step, and could batch nothing: so
each Step operator lives on a thread of its own (vLLM's engine core loop: take what arrived, step, hand the outputs
back), and SAGE only hands it requests (`submit`) and collects what it made (`take_outputs`). The engine is touched
by that thread alone, so it never sees two threads, as under sageLLM's executor."""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from typing import Any

import structlog
import trio

from sagellm.common.pulse import Pulse
from sagellm.runtime.executor.operator_calls import apply_operator, serve_item, step_once
from sagellm.runtime.pipeline.operator import SourceOperator, StepOperator, StreamOperator

log = structlog.get_logger("sagellm.sage")


class _OperatorThread:
    """What the Step and Stream hosts share: items handed in (`submit`, from SAGE's loop), outputs handed back
    (`take_outputs`), and one condition that says when either changed."""

    def __init__(self, node_id: str, op: Any) -> None:
        self.node_id, self.op = node_id, op
        self._changed = threading.Condition()  # guards the fields below and the subclass's
        self._inbox: deque[Any] = deque()
        self._outbox: deque[Any] = deque()
        self._closing = False

    def submit(self, item: Any) -> None:
        with self._changed:
            self._inbox.append(item)
            self._changed.notify_all()
        self._poke()

    def take_outputs(self) -> list[Any]:
        with self._changed:
            outputs = list(self._outbox)
            self._outbox.clear()
            return outputs

    def idle(self) -> bool:
        """Nothing waiting, being served or unread."""
        with self._changed:
            return not (self._inbox or self._working() or self._outbox)

    def wait(self, timeout: float) -> None:
        """Until the next outputs (at most `timeout`), when it is working; at once when it is not."""
        with self._changed:
            if self._working() and not self._outbox:
                self._changed.wait(timeout)

    def _emit(self, outputs: list[Any]) -> None:
        with self._changed:
            self._outbox.extend(outputs)
            self._changed.notify_all()

    def _working(self) -> bool:
        raise NotImplementedError

    def _poke(self) -> None:
        """Tells the host's thread that something arrived (the Step host waits on the condition itself)."""


class StepHost(_OperatorThread):
    """One Step operator on its own thread. Requests wait in `inbox` until the engine has room for them (its
    `capacity()`, read by this thread after every add and step), as they wait in a full engine's channel under the
    executor; `room()` tells the policy queue upstream whether to pop its next."""

    def __init__(self, node_id: str, op: StepOperator) -> None:
        super().__init__(node_id, op)
        self._capacity = op.capacity()
        self._busy = False  # the engine holds requests (or is taking some in)
        self._thread = threading.Thread(target=self._loop, name=f"sagellm-{node_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread after the step it is in; what the engine still holds stays unfinished (the job ends
        those requests with an error)."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join()

    def room(self) -> int:
        """Requests the engine would take now beyond those already waiting for it (negative: some wait)."""
        with self._changed:
            return self._capacity - len(self._inbox)

    def _working(self) -> bool:
        return self._busy

    def _loop(self) -> None:
        try:
            self._serve()
        except Exception:  # a bug around the engine, not in a step: the job ends its requests with an error
            log.exception("engine_thread_failed", node=self.node_id)
            with self._changed:
                self._inbox.clear()
                self._busy = False
                self._changed.notify_all()

    def _serve(self) -> None:
        while True:
            with self._changed:
                while not (self._inbox or self._busy or self._closing):
                    self._changed.wait()
                if self._closing:
                    return
                taken = [self._inbox.popleft() for _ in range(min(len(self._inbox), max(self._capacity, 0)))]
                self._capacity -= len(taken)  # taken in: no room for others until the engine says again
                self._busy = self._busy or bool(taken)
                if not self._busy:  # an idle engine with no room (never expected): look again soon, not in a spin
                    self._changed.wait(0.05)
                    self._capacity = self.op.capacity()
                    continue
            outputs = [out for item in taken for out in apply_operator(self.node_id, self.op, self.op.add, item)]
            if self.op.has_work():
                outputs += step_once(self.node_id, self.op)
            with self._changed:
                self._outbox.extend(outputs)
                self._capacity = self.op.capacity()
                self._busy = self.op.has_work()
                self._changed.notify_all()


class SourcePump:
    """A blocking source (stdin) polled on a thread of its own, so SAGE's loop never waits on it: `take()` returns
    what it polled so far, or None once the source is exhausted and everything was taken."""

    def __init__(self, node_id: str, op: SourceOperator) -> None:
        self.node_id, self.op = node_id, op
        self._lock = threading.Lock()
        self._ready: deque[Any] = deque()
        self._ended = False
        self._thread = threading.Thread(target=self._loop, name=f"sagellm-{node_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def take(self) -> list[Any] | None:
        with self._lock:
            if self._ended and not self._ready:
                return None
            items = list(self._ready)
            self._ready.clear()
            return items

    def _loop(self) -> None:
        try:
            while (items := self.op.poll()) is not None:
                with self._lock:
                    self._ready.extend(items)
        except Exception:
            log.exception("source_failed", node=self.node_id)
        finally:
            with self._lock:
                self._ended = True


class StreamHost(_OperatorThread):
    """One Stream operator (a server reached over HTTP) on a thread of its own running a trio loop, since its
    `serve(item)` is an async generator: each submitted item is served in a task of its own, at most `capacity()`
    at once (the rest wait in `inbox`), and ends with exactly one terminal item, as under the executor (a stream that
    raises or stops without a result ends with an `internal` error). The same surface as `StepHost`."""

    def __init__(self, node_id: str, op: StreamOperator) -> None:
        super().__init__(node_id, op)
        self._serving = 0
        self._wake = Pulse()  # fired as an item arrives, one ends, or the host stops: the loop looks again
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._serve,), name=f"sagellm-{node_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def stop(self) -> None:
        with self._changed:
            self._closing = True
        self._poke()
        self._thread.join()

    def room(self) -> int:
        with self._changed:
            return self.op.capacity() - self._serving - len(self._inbox)

    def _working(self) -> bool:
        return bool(self._serving or self._inbox)

    def _poke(self) -> None:
        """Wakes the trio loop (from any other thread)."""
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._wake.fire, trio_token=self._token)

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._ready.set()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    with self._changed:
                        if self._closing:
                            nursery.cancel_scope.cancel()
                            return
                        while self._inbox and self._serving < self.op.capacity():
                            self._serving += 1
                            nursery.start_soon(self._serve_one, self._inbox.popleft())
                    await self._wake.wait()
        finally:
            with trio.CancelScope(shield=True):
                await self.op.drained()

    async def _serve_one(self, item: Any) -> None:
        try:
            if self.op.accepts and not isinstance(item, self.op.accepts):
                self._emit([item])
            else:
                await serve_item(self.node_id, self.op, item, self._emit_one)
        finally:
            with self._changed:
                self._serving -= 1
            self._wake.fire()

    async def _emit_one(self, out: Any) -> None:
        self._emit([out])
