"""The requests that wait for a model loaded on demand (`ModelPool.ready`): one line of tickets per model.

A request that finds its model not serving takes a ticket in the model's line and sleeps on it, woken by an event,
never by polling. The pool settles a line's tickets all at once: admitted the moment the model serves (each ticket a
request follows then holds the model busy, `ModelReadiness.hold`, with no checkpoint between, so no other model's load
can evict the model before its requests are in), or refused with the error its load ended on. A ticket whose wait
runs out (`--retry-wait`) is refused on its own; one whose client leaves is taken out of its line, and the pool gives
up the turn of a model nobody waits for any more.

The metrics count every wait, and the requests refused, by why: `timeout` (the wait ran out before the model's turn
came or its load ended), `busy` (its load was given up: the model it would replace still ran requests when the drain's
time ran out), `memory` (it does not fit the memory available even alone), `failed` (its load failed)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio
from prometheus_client.core import CounterMetricFamily

from sagellm.gateway.http.errors import ApiError

log = structlog.get_logger("sagellm.gateway")


@dataclass(eq=False)
class Ticket:
    model: str
    hold: bool  # a request of the model follows its admission: the model is held busy from then
    settled: trio.Event = field(default_factory=trio.Event)
    admitted: bool = False
    refusal: ApiError | None = None


class WaitingLines:
    def __init__(self, hold: Callable[[str], None]) -> None:
        """`hold(model)`: marks a request of `model` on its way in (`ModelReadiness.hold`)."""
        self.hold = hold
        self.lines: defaultdict[str, list[Ticket]] = defaultdict(list)
        self.waits: Counter[str] = Counter()  # model -> requests that waited for it
        self.wait_seconds: Counter[str] = Counter()  # model -> seconds those waited
        self.refusals: Counter[tuple[str, str]] = Counter()  # (model, why) -> requests refused while they waited

    def join(self, model: str, hold: bool) -> Ticket:
        ticket = Ticket(model, hold)
        self.lines[model].append(ticket)
        return ticket

    def waiting(self, model: str) -> int:
        return len(self.lines.get(model, ()))

    async def wait(self, ticket: Ticket, wait_s: float, not_ready: Callable[[], ApiError]) -> None:
        """Returns once the ticket is admitted; raises its refusal, or `not_ready()` when `wait_s` runs out first. A
        cancel (the client left) takes it out of its line."""
        began = trio.current_time()
        try:
            with trio.move_on_after(wait_s):
                await ticket.settled.wait()
        finally:
            line = self.lines[ticket.model]
            if ticket in line:
                line.remove(ticket)
            waited = trio.current_time() - began
            self.waits[ticket.model] += 1
            self.wait_seconds[ticket.model] += waited
        if ticket.refusal is not None:
            raise ticket.refusal
        if not ticket.admitted:
            self.refusals[ticket.model, "timeout"] += 1
            raise not_ready()
        log.info("model_waited", model=ticket.model, wait_s=round(waited, 2))

    def admit(self, model: str) -> None:
        """The model serves: every ticket in its line is admitted (those a request follows hold it busy)."""
        for ticket in self.lines.pop(model, ()):
            if ticket.hold:
                self.hold(model)
            ticket.admitted = True
            ticket.settled.set()

    def refuse(self, model: str, error: ApiError, why: str) -> None:
        """The model's load ended without it serving: every ticket in its line is refused with `error`."""
        tickets = self.lines.pop(model, [])
        if tickets:
            self.refusals[model, why] += len(tickets)
        for ticket in tickets:
            ticket.refusal = error
            ticket.settled.set()

    def collect(self) -> Iterator[Any]:
        """Prometheus families of the waits and refusals."""
        waits = CounterMetricFamily(
            "sagellm:model_load_waits", "Requests that waited for their model.", labels=["model"]
        )
        seconds = CounterMetricFamily(
            "sagellm:model_load_wait_seconds", "Seconds requests waited for their model.", labels=["model"]
        )
        for name, count in self.waits.items():
            waits.add_metric([name], count)
            seconds.add_metric([name], self.wait_seconds[name])
        refusals = CounterMetricFamily(
            "sagellm:model_load_refusals",
            "Requests refused (503) while they waited for their model, by why: timeout, busy, memory, failed.",
            labels=["model", "reason"],
        )
        for (name, why), count in self.refusals.items():
            refusals.add_metric([name, why], count)
        yield from (waits, seconds, refusals)
