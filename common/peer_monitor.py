"""Liveness by silence, one way for every peer we hear from (pipeline workers and their parent over the control
socket, API servers and their serving core over the hub): a peer silent for the timeout is lost."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any, NoReturn

import trio

from sagellm.common.errors import InvalidInput


class PeerMonitor:
    """Last-seen times of peers; a peer silent for `timeout` or longer is lost. Times are the receiver's own clock
    (trio's by default), so clock skew between hosts does not matter and tests run on a virtual clock."""

    def __init__(self, timeout: float, clock: Callable[[], float] = trio.current_time) -> None:
        if timeout <= 0:
            raise InvalidInput(f"timeout must be > 0, got {timeout}")
        self.timeout = timeout
        self._clock = clock
        self._last_seen: dict[Hashable, float] = {}

    def seen(self, peer: Hashable) -> None:
        """Any message from `peer` (Ready starts watching it, Heartbeat keeps it alive)."""
        self._last_seen[peer] = self._clock()

    def forget(self, peer: Hashable) -> None:
        """Stops watching `peer` (it sent End, or was reported lost)."""
        self._last_seen.pop(peer, None)

    def lost(self) -> list[Hashable]:
        """Watched peers silent for `timeout` or longer."""
        now = self._clock()
        return [peer for peer, last in self._last_seen.items() if now >= last + self.timeout]

    def next_deadline(self) -> float:
        """When the earliest watched peer is lost unless heard from (inf when none is watched)."""
        return min((last + self.timeout for last in self._last_seen.values()), default=math.inf)

    async def watch(self, on_lost: Callable[[Any], object]) -> NoReturn:
        """Calls `on_lost(peer)` once for each peer as it is lost (and stops watching it), until cancelled. Sleeps
        until the next deadline but at most `timeout`, so peers seen later are caught in time."""
        while True:
            for peer in self.lost():
                self.forget(peer)
                on_lost(peer)
            now = self._clock()
            await trio.sleep(max(0.0, min(self.next_deadline(), now + self.timeout) - now))
