"""`HybridQueue`: the `policy_sort` policy behind the seed's `HybridSchedulingPolicy` when embeddings do not simply
share the queue with generations: each kind waits in a queue of its own, ordered by one of sageLLM's policies (the
hybrid's `llm_fallback_policy`), and `embedding_priority` says which queue gives first.

- "high": waiting embeddings first (embedding latency matters most, as for a search box);
- "low": waiting generations first;
- "adaptive": embeddings first while they are more than `ADAPTIVE_EMBEDDING_SHARE` of all that wait (the seed's
  rule), so a growing backlog of embeddings is worked down.

Only the order is the policy's: route sends an embedding request only to embedding instances and a generation only
to LLM ones, and an embedding server batches what it is sent."""

from __future__ import annotations

import functools
from typing import ClassVar

from sagellm.operators.policies import Clock, Policy, make_policy, register_runtime_policy
from sagellm.runtime.pipeline.messages import Request, RequestError
from sagellm.runtime.pipeline.operator import OperatorContext

ADAPTIVE_EMBEDDING_SHARE = 0.4


class HybridQueue(Policy):
    """Each subclass (made by `hybrid_queue`) says the policy ordering each kind and which kind gives first."""

    fallback: ClassVar[str]
    embedding_priority: ClassVar[str]

    def __init__(self, ctx: OperatorContext, clock: Clock) -> None:
        super().__init__(ctx, clock)
        self.generations = make_policy(self.fallback, ctx, clock)
        self.embeddings = make_policy(self.fallback, ctx, clock)

    def _queue_of(self, request: Request) -> Policy:
        return self.embeddings if request.phase == "embed" else self.generations

    def _in_turn(self) -> tuple[Policy, Policy]:
        """The queue that gives first, then the other."""
        share = len(self.embeddings) / max(len(self), 1)
        first = self.embedding_priority == "high" or (
            self.embedding_priority == "adaptive" and share > ADAPTIVE_EMBEDDING_SHARE
        )
        return (self.embeddings, self.generations) if first else (self.generations, self.embeddings)

    def check(self, request: Request) -> RequestError | None:
        return self._queue_of(request).check(request)

    def push(self, request: Request) -> None:
        self._queue_of(request).push(request)

    def pop(self) -> Request | RequestError | None:
        for queue in self._in_turn():
            item = queue.pop() if len(queue) else None
            if item is not None:
                return item
        return None

    def shed(self) -> Request:
        """From the queue that gives last, while it has any."""
        first, last = self._in_turn()
        return (last if len(last) else first).shed()

    def drain(self) -> list[Request]:
        first, last = self._in_turn()
        return first.drain() + last.drain()

    def remove(self, request_ids: set[str]) -> list[Request]:
        return self.generations.remove(request_ids) + self.embeddings.remove(request_ids)

    def __len__(self) -> int:
        return len(self.generations) + len(self.embeddings)


@functools.cache
def hybrid_queue(fallback: str, embedding_priority: str) -> str:
    """The name of the `HybridQueue` for these settings, registered as a scheduling policy of this process."""
    name = f"hybrid_{embedding_priority}_{fallback}"
    attrs = {"name": name, "fallback": fallback, "embedding_priority": embedding_priority}
    register_runtime_policy(type(f"HybridQueue_{embedding_priority}_{fallback}", (HybridQueue,), attrs))
    return name
