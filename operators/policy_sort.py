"""The policy_sort operator: the queue in front of the engines, ordered by a scheduling policy (`policies`).

The executor pops only when downstream has room, so this queue's order is exactly the order in which requests reach
the engines under load, and its bound (`max_len`) is where the graph sheds: when full, the lowest-ranked request by
the policy's own order (the newcomer or one already waiting) leaves at once as an `overloaded` RequestError. Items
other than requests pass through (the executor does that from `accepts`).

The clock is an attribute (wall clock by default), not a parameter: tests replace it before `open()`, which hands it
to the policy."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import ClassVar

from sagellm.common import tracing
from sagellm.common.errors import FieldError
from sagellm.operators.policies import POLICIES, Policy, make_policy
from sagellm.runtime.pipeline.messages import Request, RequestError
from sagellm.runtime.pipeline.operator import OperatorContext, OperatorError, QueueOperator, register_operator


@register_operator
class PolicySort(QueueOperator):
    name = "policy_sort"
    accepts = (Request,)
    traced = False  # a traced request's span here is its wait, from its push to its pop (`pop`)
    parameter_help: ClassVar[dict[str, str]] = {
        "policy": "the scheduling policy: fifo, priority, slo_aware, cost_optimized or adaptive",
        "max_len": "most waiting requests; the lowest-ranked leaves as overloaded (default: unbounded)",
        "policy_args": "the policy's own settings, e.g. adaptive's thresholds",
    }

    def __init__(self, policy: str = "fifo", max_len: int | None = None, policy_args: dict[str, float] | None = None):
        if max_len is not None and max_len < 1:
            raise FieldError("max_len", f"policy_sort: max_len must be >= 1 or unset, got {max_len}")
        self.clock: Callable[[], float] = time.time
        # Built once here so a bad name or argument fails when the graph is built; rebuilt with the real context.
        try:
            self.policy: Policy = make_policy(policy, OperatorContext(node_id=self.name), self.clock, policy_args)
        except OperatorError as error:  # a bad name, or arguments the policy does not take
            raise FieldError("policy" if policy not in POLICIES else "policy_args", str(error)) from None
        self.policy_name, self.policy_args, self.max_len = policy, policy_args, max_len

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        self.policy = make_policy(self.policy_name, ctx, self.clock, self.policy_args)

    def switch_policy(self, policy: str, policy_args: dict[str, float] | None = None) -> None:
        """Replaces the policy while serving (the gateway's `/admin/set_policy`): whatever waits moves over and
        leaves in the new policy's order. A bad name raises before anything moves."""
        new = make_policy(policy, self.ctx, self.clock, policy_args)
        for request in self.policy.drain():
            new.push(request)
        self.policy, self.policy_name, self.policy_args = new, policy, policy_args

    def push(self, item: Request) -> list[RequestError]:
        rejection = self.policy.check(item)
        if rejection is not None:
            return [rejection]
        self.policy.push(item)
        if self.max_len is None or len(self.policy) <= self.max_len:
            return []
        shed = self.policy.shed()
        return [
            RequestError(
                request_id=shed.request_id,
                code="overloaded",
                message=f"the {self.policy_name} queue is full ({self.max_len} waiting); retry later",
                retryable=True,
                time=self.clock(),
            )
        ]

    def pop(self) -> Request | RequestError | None:
        item = self.policy.pop()
        if isinstance(item, Request):
            item.dispatched_time = self.clock()
            if item.trace is not None:  # its wait here, in the policy's order, is a span of its trace
                waited_from = item.admitted_time or item.arrival_time
                tracing.record("policy_queue", item.trace, waited_from, item.dispatched_time,
                               {"sagellm.policy": self.policy_name})  # fmt: skip
        return item

    def withdraw(self, request_ids: set[str]) -> list[Request]:
        return self.policy.remove(request_ids)

    def __len__(self) -> int:
        return len(self.policy)
