"""The threads a SAGE job keeps beside SAGE's own: an engine that steps while SAGE dispatches, and a blocking source
polled off SAGE's loop.

SAGE's local runtime dispatches every item synchronously, from one loop that polls the sources in turn. An engine
stepped inside that loop would hold every other node still for the length of a step, and could batch nothing: so
each Step operator lives on a thread of its own (vLLM's engine core loop: take what arrived, step, hand the outputs
back), and SAGE only hands it requests (`submit`) and collects what it made (`take_outputs`). The engine is touched
by that thread alone, so it never sees two threads, as under sageLLM's executor."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import structlog

from sagellm.runtime.executor.local import apply_operator, internal_error
from sagellm.runtime.pipeline.operator import SourceOperator, StepOperator

log = structlog.get_logger("sagellm.sage")


class StepHost:
    """One Step operator on its own thread. Requests wait in `inbox` until the engine has room for them (its
    `capacity()`, read by this thread after every add and step), as they wait in a full engine's channel under the
    executor; `room()` tells the policy queue upstream whether to pop its next."""

    def __init__(self, node_id: str, op: StepOperator) -> None:
        self.node_id, self.op = node_id, op
        self._changed = threading.Condition()  # guards the fields below
        self._inbox: deque[Any] = deque()
        self._outbox: deque[Any] = deque()
        self._capacity = op.capacity()
        self._busy = False  # the engine holds requests (or is taking some in)
        self._closing = False
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

    def submit(self, item: Any) -> None:
        with self._changed:
            self._inbox.append(item)
            self._changed.notify_all()

    def room(self) -> int:
        """Requests the engine would take now beyond those already waiting for it (negative: some wait)."""
        with self._changed:
            return self._capacity - len(self._inbox)

    def take_outputs(self) -> list[Any]:
        with self._changed:
            outputs = list(self._outbox)
            self._outbox.clear()
            return outputs

    def idle(self) -> bool:
        """Nothing waiting, running or unread."""
        with self._changed:
            return not (self._inbox or self._busy or self._outbox)

    def wait(self, timeout: float) -> None:
        """Until the engine's next turn ends (at most `timeout`), when it is working; at once when it is not."""
        with self._changed:
            if self._busy and not self._outbox:
                self._changed.wait(timeout)

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
                outputs += self._step()
            with self._changed:
                self._outbox.extend(outputs)
                self._capacity = self.op.capacity()
                self._busy = self.op.has_work()
                self._changed.notify_all()

    def _step(self) -> list[Any]:
        """One engine step; a failed step fails the requests the engine held, and the engine serves on."""
        try:
            return self.op.step()
        except Exception as exc:
            held = self.op.in_flight()
            log.exception("step_failed", node=self.node_id, requests=len(held))
            self.op.abort(held)
            return [internal_error(rid, self.node_id, exc) for rid in held]


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
