"""What a key used in the last minute: the window its per-minute limits are checked on.

A sliding window, not a bucket that refills: "60 requests per minute" then means at most 60 in any 60 seconds, which
is what a client reads in the limit and what a test can count, and the time to wait is exact (when the oldest use
that must leave the window does)."""

from __future__ import annotations

from collections import deque

WINDOW_S = 60.0


class MinuteWindow:
    """Amounts used (requests, tokens) at monotonic times, those older than WINDOW_S forgotten."""

    def __init__(self) -> None:
        self._uses: deque[tuple[float, int]] = deque()
        self._total = 0

    def used(self, now: float) -> int:
        while self._uses and self._uses[0][0] <= now - WINDOW_S:
            self._total -= self._uses.popleft()[1]
        return self._total

    def add(self, now: float, amount: int) -> None:
        self.used(now)  # what left the window goes: a key no limit reads still keeps only its last minute
        if amount:
            self._uses.append((now, amount))
            self._total += amount

    def take_back(self, amount: int) -> None:
        """Undoes the latest `add` of `amount` (a request the door refused after it was counted)."""
        if amount and self._uses and self._uses[-1][1] == amount:
            self._uses.pop()
            self._total -= amount

    def wait_s(self, now: float, limit: int, need: int) -> float:
        """Seconds until `need` more fits under `limit` (0: it fits now), once the oldest uses have left."""
        excess = self.used(now) + need - limit
        for when, amount in self._uses:
            if excess <= 0:
                break
            excess -= amount
            if excess <= 0:
                return max(0.0, when + WINDOW_S - now)
        return 0.0 if excess <= 0 else WINDOW_S
