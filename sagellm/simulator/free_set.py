"""The cluster simulator's instances with a free slot, a set per role. Route draws among them for every request
(`sample` of them, at 1,000 instances, where scanning them all per request is too slow), and every step boundary
adds or discards one: each is O(1)."""

from __future__ import annotations

from sagellm.simulator.instance import Instance


class FreeSet:
    """The instances with a free slot: add, discard and draw by position in O(1)."""

    def __init__(self) -> None:
        self.items: list[Instance] = []
        self.pos: dict[int, int] = {}

    def add(self, instance: Instance) -> None:
        if instance.index not in self.pos:
            self.pos[instance.index] = len(self.items)
            self.items.append(instance)

    def discard(self, instance: Instance) -> None:
        p = self.pos.pop(instance.index, None)
        if p is None:
            return
        last = self.items.pop()
        if last is not instance:
            self.items[p] = last
            self.pos[last.index] = p
