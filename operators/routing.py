"""The routing strategies the `route` operator chooses among, by name: each picks one engine instance for a request.

A strategy sees the request, its candidate instances (healthy, of the right role, in the route node's output order)
and the chained block hashes of its prompt; it only reads. The `route` operator applies the choice: it records the
prompt in the shared `PrefixIndex` and charges the chosen instance's `InstanceStats`, so the next decision sees this
one. Every choice is deterministic given the inputs (ties go to the earliest candidate; `random` is seeded).

- load_balanced: an instance with a free slot first (a request sent to a full one waits in its queue, and route waits
  with it for room), then least `predicted_work` (queued prefill + decode tokens), then fewest running.
- round_robin: the candidates in turn.
- random: uniform, from a seeded `random.Random`.
- affinity: consistent hashing of `request.user` (the request id when anonymous), so a user's requests land on one
  instance and adding or removing an instance moves only about 1/N of the users.
- locality: consistent hashing of the prompt's first block, so prompts sharing a system prompt share an instance.
- cache_aware: least cost in tokens: the prompt tokens that instance has not cached, plus its queued work; a cached
  prefix attracts a request until the instance's queue outweighs the prefill it would save (SGLang's cache-aware
  router idea, with the trade-off made explicit in one unit)."""

from __future__ import annotations

import bisect
import random
from collections import OrderedDict
from typing import ClassVar

from sagellm.common.registry import Registry
from sagellm.operators.prefix_index import PrefixIndex
from sagellm.runtime.engine.prefix_hash import ROOT_HASH, hash_block, stable_hash
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.operator import InstanceStats, OperatorError

VIRTUAL_NODES = 160  # ring points per instance: keeps each instance's share within a few % of 1/N


class RoutingStrategy:
    """Base of the strategies. `choose` is called only with at least one candidate."""

    name: ClassVar[str] = ""

    def __init__(self, *, prefix_index: PrefixIndex, seed: int | None = None) -> None:
        self.prefix_index = prefix_index
        self.seed = seed

    def choose(self, request: Request, candidates: list[InstanceStats], hashes: list[int]) -> InstanceStats:
        raise NotImplementedError


STRATEGIES: Registry[type[RoutingStrategy]] = Registry("routing strategy", error=OperatorError)
register_strategy = STRATEGIES.register


def make_strategy(name: str, *, prefix_index: PrefixIndex, seed: int | None = None) -> RoutingStrategy:
    return STRATEGIES.get(name)(prefix_index=prefix_index, seed=seed)


class HashRing:
    """Consistent hashing: each instance owns the arcs before its `VIRTUAL_NODES` points on a 64-bit ring, so a key
    keeps its instance unless that instance leaves or a new one takes over the key's arc."""

    def __init__(self, names: list[str], virtual_nodes: int = VIRTUAL_NODES) -> None:
        points = sorted((stable_hash(f"{name}#{i}".encode()), name) for name in names for i in range(virtual_nodes))
        self._points = [p for p, _ in points]
        self._names = [n for _, n in points]

    def lookup(self, key: int) -> str:
        """The instance owning `key`: the first point clockwise from it."""
        return self._names[bisect.bisect_left(self._points, key) % len(self._points)]


class _ConsistentHashing(RoutingStrategy):
    """Shared by affinity and locality: a ring per candidate set, built once and kept (few sets occur in practice)."""

    _MAX_RINGS = 64

    def __init__(self, *, prefix_index: PrefixIndex, seed: int | None = None) -> None:
        super().__init__(prefix_index=prefix_index, seed=seed)
        self._rings: OrderedDict[tuple[str, ...], HashRing] = OrderedDict()

    def key(self, request: Request, hashes: list[int]) -> int:
        raise NotImplementedError

    def choose(self, request: Request, candidates: list[InstanceStats], hashes: list[int]) -> InstanceStats:
        names = tuple(sorted(c.name for c in candidates))
        ring = self._rings.get(names)
        if ring is None:
            ring = self._rings[names] = HashRing(list(names))
            if len(self._rings) > self._MAX_RINGS:
                self._rings.popitem(last=False)
        self._rings.move_to_end(names)
        owner = ring.lookup(self.key(request, hashes))
        return next(c for c in candidates if c.name == owner)


@register_strategy
class LoadBalanced(RoutingStrategy):
    name = "load_balanced"

    def choose(self, request: Request, candidates: list[InstanceStats], hashes: list[int]) -> InstanceStats:
        return min(candidates, key=lambda c: (c.saturated, c.predicted_work, c.running))  # the first of equals


@register_strategy
class RoundRobin(RoutingStrategy):
    name = "round_robin"

    def __init__(self, *, prefix_index: PrefixIndex, seed: int | None = None) -> None:
        super().__init__(prefix_index=prefix_index, seed=seed)
        self._next = 0

    def choose(self, request: Request, candidates: list[InstanceStats], hashes: list[int]) -> InstanceStats:
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen


@register_strategy
class Random(RoutingStrategy):
    name = "random"

    def __init__(self, *, prefix_index: PrefixIndex, seed: int | None = None) -> None:
        super().__init__(prefix_index=prefix_index, seed=seed)
        self._rng = random.Random(seed)

    def choose(self, request: Request, candidates: list[InstanceStats], hashes: list[int]) -> InstanceStats:
        return self._rng.choice(candidates)


@register_strategy
class Affinity(_ConsistentHashing):
    name = "affinity"

    def key(self, request: Request, hashes: list[int]) -> int:
        return stable_hash((request.user if request.user is not None else request.request_id).encode())


@register_strategy
class Locality(_ConsistentHashing):
    """Keyed by the prompt's first block (all of it when shorter than a block), as chained-hashed by the index."""

    name = "locality"

    def key(self, request: Request, hashes: list[int]) -> int:
        if hashes:
            return hashes[0]
        if request.prompt_token_ids:
            return hash_block(ROOT_HASH, request.prompt_token_ids)
        return stable_hash(request.request_id.encode())


@register_strategy
class CacheAware(RoutingStrategy):
    name = "cache_aware"

    def cost(self, request: Request, instance: InstanceStats, hashes: list[int]) -> int:
        """Tokens this request would wait for on `instance`: its own uncached prefill plus the instance's queue."""
        tokens = request.prompt_token_ids or []
        uncached = len(tokens) - self.prefix_index.cached_tokens(instance.name, tokens, hashes)
        return uncached + instance.predicted_work

    def choose(self, request: Request, candidates: list[InstanceStats], hashes: list[int]) -> InstanceStats:
        return min(candidates, key=lambda c: self.cost(request, c, hashes))
