"""The request ledger of one process's executor: which requests are in flight, what each produced, and the
invariant that every request ends with exactly one terminal item.

The executor tells it what enters from a source (`entered`) and what reaches a leaf of the graph (`observe`); the
ledger keeps each request's outcome, drops a second terminal for a request (and logs it), keeps the graph's
`PipelineLoad` counters that admission and the adaptive policy read, remembers which requests' clients left
(`cancel`), and at the end gives every request that never finished its one terminal error (`fail_unfinished`)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from sagellm.runtime.engine.outputs import RequestMetrics
from sagellm.runtime.pipeline.messages import Embedding, RequestError, TokenDelta, is_terminal
from sagellm.runtime.pipeline.operator import PipelineLoad

log = structlog.get_logger("sagellm.executor")
ENDED_REMEMBERED = 100_000  # ids of ended requests kept to drop duplicates when outcomes are not kept
PASSING_CANCELS_REMEMBERED = 10_000  # cancelled requests that only pass through this process (a worker's)


@dataclass
class RequestOutcome:
    """What one request produced, as the graph's leaves saw it."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: RequestError | None = None
    metrics: RequestMetrics | None = None
    embedding: list[float] | None = None  # an embed request's vector

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None or self.embedding is not None


class RequestLedger:
    def __init__(self, *, keep_outcomes: bool = True) -> None:
        """`keep_outcomes=False` forgets each request's outcome once it ended, as a server that runs for weeks must
        (its replies went to `on_leaf_item`); recently ended ids are still remembered to drop duplicates."""
        self.load = PipelineLoad()
        self.outcomes: dict[str, RequestOutcome] = {}
        self.keep_outcomes = keep_outcomes
        self.on_leaf_item: Callable[[Any], None] | None = None  # every item that reaches a leaf (the gateway's replies)
        self.on_terminal: list[Callable[[Any], None]] = []  # called at each request's end
        # The code and message of requests still unfinished when the graph ends (the process executor names a
        # lost worker here); anything else left unfinished is a bug, reported as `internal`.
        self.unfinished_error: tuple[str, str] = ("internal", "the pipeline ended without finishing it")
        self._in_flight: set[str] = set()  # entered from a source here, counted in load.in_flight, not yet ended
        self._cancelled: set[str] = set()  # in flight, and their client left
        self._passing_cancels: deque[str] = deque()  # cancelled, and not entered here: their end may never pass here
        self._ended: deque[str] = deque()
        self._ended_ids: set[str] = set()
        self._failed_as_lost: set[str] = set()  # ended with instance_lost, among the remembered ended ids
        self._awaiting_first: dict[str, float] = {}  # entered here, no token yet -> arrival time, oldest first

    def entered(self, request_id: str, arrival_time: float | None = None) -> None:
        """A request entered the graph here; given its `arrival_time`, its time to first token is recorded when its
        first token reaches a leaf (`PipelineLoad.recent_ttfts`), and until then it counts among those waiting."""
        self._in_flight.add(request_id)
        self.load.in_flight += 1
        if arrival_time is not None:
            self._awaiting_first[request_id] = arrival_time
            if self.load.oldest_waiting is None:
                self.load.oldest_waiting = arrival_time

    def cancel(self, request_id: str, *, passing: bool = False) -> None:
        """Marks a request whose client left. `passing`: it did not enter here (a worker is told by the parent), so
        it is remembered until an engine here aborts it, or among the last PASSING_CANCELS_REMEMBERED."""
        if request_id in self._in_flight:
            self._cancelled.add(request_id)
        elif passing and request_id not in self._cancelled:
            self._cancelled.add(request_id)
            self._passing_cancels.append(request_id)
            if len(self._passing_cancels) > PASSING_CANCELS_REMEMBERED:
                self._cancelled.discard(self._passing_cancels.popleft())

    def aborted(self, request_id: str) -> None:
        """An engine here aborted a cancelled request that only passes through: nothing more to do for it here."""
        if request_id not in self._in_flight:
            self._cancelled.discard(request_id)

    def is_cancelled(self, request_id: str | None) -> bool:
        return request_id in self._cancelled

    @property
    def any_cancelled(self) -> bool:
        return bool(self._cancelled)

    def observe(self, item: Any) -> bool:
        """Records an item that reached a leaf; False (and nothing recorded) for a second terminal of a request."""
        rid = getattr(item, "request_id", None)
        if rid is None:
            return True
        outcome = self.outcomes.get(rid)
        if outcome.finished if outcome is not None else rid in self._ended_ids:
            if rid in self._failed_as_lost:  # expected: failed when its worker was lost, it lived on elsewhere
                log.debug("late_item_dropped", request_id=rid, item=type(item).__name__)
            else:
                log.error("duplicate_terminal_dropped", request_id=rid, item=type(item).__name__)
            return False
        if outcome is None:
            outcome = self.outcomes[rid] = RequestOutcome(rid)
        if rid in self._awaiting_first:
            self._first_item(rid, item)
        if isinstance(item, TokenDelta):
            if self.keep_outcomes:  # else the replies went to `on_leaf_item`, and the outcome only says it ended
                outcome.token_ids.extend(item.token_ids)
                outcome.text += item.text
            outcome.finish_reason, outcome.metrics = item.finish_reason, item.metrics
        elif isinstance(item, RequestError):
            outcome.error, outcome.metrics = item, item.metrics
        elif isinstance(item, Embedding):
            outcome.embedding, outcome.metrics = item.vector, item.metrics
        if is_terminal(item):
            self._end(item)
        if self.on_leaf_item is not None:
            self.on_leaf_item(item)
        if outcome.finished and not self.keep_outcomes:
            self._forget(rid)
        return True

    def _first_item(self, rid: str, item: Any) -> None:
        """The request's first item: its time to first token if it is a token (a finished delta without one, or an
        error, says nothing of the queue), and the oldest request still waiting moves on."""
        arrival = self._awaiting_first.pop(rid)
        if isinstance(item, TokenDelta) and (item.token_ids or item.text):
            self.load.recent_ttfts.append(item.time - arrival)
            self.load.ttfts_seen += 1
        self.load.oldest_waiting = next(iter(self._awaiting_first.values()), None)

    def fail_unfinished(self) -> None:
        """Requests that entered and never ended are a bug somewhere, or a lost worker's: they still get their one
        terminal item."""
        for rid in sorted(self._in_flight):
            log.error("request_lost", request_id=rid)
            code, message = self.unfinished_error
            self.observe(RequestError(request_id=rid, code=code, message=message, retryable=code != "internal"))

    def _end(self, item: TokenDelta | Embedding | RequestError) -> None:
        rid = item.request_id
        self._cancelled.discard(rid)
        self.load.release_tokens(rid)
        if rid in self._in_flight:
            self._in_flight.discard(rid)
            self.load.in_flight -= 1
        if isinstance(item, RequestError):
            self.load.failed += 1
            if item.code == "instance_lost":
                self._failed_as_lost.add(rid)
        else:
            self.load.completed += 1
            self.load.recent_ends.append(time.time())
        if item.metrics is not None and item.metrics.slo_met is not None:
            self.load.slo_checked += 1
            self.load.slo_violations += not item.metrics.slo_met
        for callback in self.on_terminal:
            callback(item)

    def _forget(self, rid: str) -> None:
        """Drops an ended request's outcome but remembers its id a while, so a stray second terminal is still seen
        as one (an outcome is created anew for an id not remembered)."""
        del self.outcomes[rid]
        self._ended.append(rid)
        self._ended_ids.add(rid)
        if len(self._ended) > ENDED_REMEMBERED:
            oldest = self._ended.popleft()
            self._ended_ids.discard(oldest)
            self._failed_as_lost.discard(oldest)
