"""The scheduler's waiting queue, in the order its scheduling policy (`EngineConfig.scheduling_policy`) serves it.

`fcfs` serves arrivals in turn; `priority` serves the lowest `Sequence.priority` first (vLLM's convention, the same
order as the pipeline's `priority` policy queue) and arrivals in turn among equals. Both take back a preempted sequence
ahead of those that came after it, so preemption never costs a sequence its place. The scheduler asks only what
`RequestQueue` declares, whichever order it holds."""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator

from sagellm.runtime.engine.sequence import Sequence


def serving_order(seq: Sequence) -> tuple[int, float]:
    """What `priority` sorts by: the lower, the sooner. The highest running one is the first preempted."""
    return seq.priority, seq.arrival_time


class RequestQueue(ABC):
    """The waiting sequences in serving order; the two policies differ only in where a sequence goes in and how the
    first comes out."""

    _seqs: deque[Sequence] | list[Sequence]

    @abstractmethod
    def add(self, seq: Sequence) -> None:
        """Queues a new arrival behind those it ranks with."""

    @abstractmethod
    def prepend(self, seq: Sequence) -> None:
        """Takes back a preempted sequence ahead of those it ranks with: it started before them."""

    @abstractmethod
    def pop(self) -> Sequence:
        """Takes out the sequence served next (IndexError when empty)."""

    def peek(self) -> Sequence:
        """The sequence served next (IndexError when empty)."""
        return self._seqs[0]

    def remove(self, seq: Sequence) -> None:
        """Takes out `seq` wherever it waits (an abort); ValueError when it is not here."""
        self._seqs.remove(seq)

    def __iter__(self) -> Iterator[Sequence]:
        """The sequences in serving order."""
        return iter(self._seqs)

    def __len__(self) -> int:
        return len(self._seqs)

    def __bool__(self) -> bool:
        return len(self) > 0


class FcfsQueue(RequestQueue):
    """First come, first served; a preempted sequence goes back to the very front."""

    def __init__(self) -> None:
        self._seqs: deque[Sequence] = deque()

    def add(self, seq: Sequence) -> None:
        self._seqs.append(seq)

    def prepend(self, seq: Sequence) -> None:
        self._seqs.appendleft(seq)

    def pop(self) -> Sequence:
        return self._seqs.popleft()


class PriorityQueue(RequestQueue):
    """Sorted by `serving_order`. A sorted list rather than a heap: the engine's stats walk the queue every step, and
    a list walks in order for free; inserting shifts pointers, cheap at any queue length an engine holds."""

    def __init__(self) -> None:
        self._seqs: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        bisect.insort_right(self._seqs, seq, key=serving_order)

    def prepend(self, seq: Sequence) -> None:
        bisect.insort_left(self._seqs, seq, key=serving_order)

    def pop(self) -> Sequence:
        return self._seqs.pop(0)


# policy name (`EngineConfig.scheduling_policy`, which checks it) -> its queue
QUEUES: dict[str, type[RequestQueue]] = {"fcfs": FcfsQueue, "priority": PriorityQueue}
