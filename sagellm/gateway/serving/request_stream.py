"""One client request's stream of items, kept whole across the instances that serve it: failover and resume.

Each attempt runs the whole graph (admission, the policy queue, route, an instance, metrics). When an attempt fails
in a way another attempt may not (its instance was lost or could not be reached, no instance was healthy, it timed
out), the stream tries again, up to `max_retries` times, each time once an instance of the model is healthy (the lost
one may be restarting; up to `retry_wait_s`) and avoiding the instances that failed it while another can take it:
- before the first token, the same request again;
- after tokens, a resume: the prompt and the tokens so far are prefilled on the next instance (its prefix cache
  makes that cheap) and the client's stream goes on with no token repeated or missing. Greedy output is the
  uninterrupted run's; seeded sampling too, since the sampler seeds each token from (seed, position). Another
  model's server is resumed from text: a completion's prompt plus the text so far, max_tokens less one token per
  event that brought text; a chat there is not resumed (no portable way to continue an assistant message), its
  failure is the client's.
An attempt that gives no first token within `first_token_timeout_s`, or no next one within `token_timeout_s`, is
cancelled and counts as failed; with nothing left to try the client gets `timeout` (HTTP 504). The serving core checks
these deadlines for every stream a few times a second (`expire_if_stalled`) rather than each wait arming a timer: a
token costs no cancel scope. Every request still ends with exactly one terminal item."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec
import structlog
import trio

from sagellm.gateway.config import FailoverPolicy
from sagellm.gateway.serving.errors import api_error
from sagellm.gateway.serving.instances import InstanceRegistry
from sagellm.gateway.serving.item_stream import ItemStream
from sagellm.runtime.pipeline.messages import Embedding, Request, RequestError, TokenDelta, is_terminal

log = structlog.get_logger("sagellm.gateway")
RETRIED_CODES = frozenset({"instance_lost", "unavailable", "timeout"})  # what another attempt may not meet


class Attempts(Protocol):
    """What a stream needs of whoever runs its attempts (`attempts.AttemptTable`)."""

    registry: InstanceRegistry

    def cancel(self, request_id: str) -> None: ...
    def abandon(self, request_id: str) -> None: ...
    def take_back(self, request_id: str) -> bool: ...
    def resubmit(self, stream: RequestStream, attempt: Request) -> bool: ...
    def count_retry(self, code: str, resumed: bool) -> None: ...
    def ended(self, stream: RequestStream) -> None: ...


class RequestStream(ItemStream):
    """The items of one client request (TokenDeltas, then one terminal TokenDelta, Embedding or RequestError),
    whichever attempts produced them. Iterating it again goes on where the last iteration stopped."""

    def __init__(self, core: Attempts, request: Request, policy: FailoverPolicy) -> None:
        super().__init__()
        self.core, self.request, self.policy = core, request, policy
        self.attempt = request  # the attempt running now
        self.retries = 0
        self._progress_at = trio.current_time()  # when the attempt started or last delivered an item
        self.outcome: TokenDelta | Embedding | RequestError | None = None  # the terminal item the client got
        self._token_ids: list[int] = []  # what the client got so far
        self._text_without_ids = False  # some text came without its token ids
        self._text = ""
        self._text_events = 0  # events that brought text from another model's server: each a token or more
        self._reached_engine = False  # found past the gateway's queues once (`expire_if_queued_too_long`)
        self._first_token_timeout_s = request.first_token_timeout_s or policy.first_token_timeout_s
        self._token_timeout_s = request.token_timeout_s or policy.token_timeout_s

    async def __anext__(self) -> TokenDelta | Embedding | RequestError:
        """The next item the client gets, failed attempts retried (`ItemStream.__anext__`)."""
        while not self.done:
            item = await self._items.get()
            if isinstance(item, RequestError) and _worth_retrying(item) and await self._retry(item):
                continue
            if isinstance(item, TokenDelta):
                item = self._as_client_sees(item)
            if is_terminal(item):
                self.done, self.outcome = True, item
                self.core.ended(self)
            return item
        raise StopAsyncIteration

    def deliver(self, item: TokenDelta | Embedding | RequestError) -> None:
        super().deliver(item)
        self._progress_at = trio.current_time()

    def cancel(self) -> None:
        """The client left: the request is aborted wherever it is."""
        if not self.done:
            self.done = True
            self.core.cancel(self.attempt.request_id)
            self.core.ended(self)

    @property
    def output_tokens(self) -> int:
        """The tokens the client got (another model's server's: one per event with text, at least)."""
        return len(self._token_ids) or self._text_events

    def status(self) -> dict[str, Any]:
        """Where the request is: queued (waiting for an instance), running, completed, failed or cancelled."""
        if self.outcome is not None:
            state = "failed" if isinstance(self.outcome, RequestError) else "completed"
        else:
            state = "cancelled" if self.done else "running" if self.attempt.dispatched_time else "queued"
        error = self.outcome if isinstance(self.outcome, RequestError) else None
        return {
            "id": self.request.request_id,
            "object": "request",
            "status": state,
            "model": self.request.model,
            "instance": self.attempt.instance,
            "retries": self.retries,
            "created": self.request.arrival_time,
            "output_tokens": self.output_tokens,
            "finish_reason": self.outcome.finish_reason if isinstance(self.outcome, TokenDelta) else None,
            "error": {"code": error.code, "message": error.message} if error is not None else None,
        }

    def expire_if_stalled(self, now: float) -> None:
        """Ends the running attempt with a `timeout` error when it has given no item for longer than its deadline
        allows (the first token's, or the next one's); the attempt is abandoned: cancelled, its late items dropped.
        The serving core calls it for the streams whose attempts are running."""
        started = bool(self._token_ids or self._text or self._items)
        timeout = self._token_timeout_s if started else self._first_token_timeout_s
        if self.done or now - self._progress_at <= timeout:
            return
        self.core.abandon(self.attempt.request_id)
        which = "next token" if started else "first token"
        where = f" from {self.attempt.instance}" if self.attempt.instance else ""
        message = f"no {which}{where} within {timeout:g} s"
        self.deliver(RequestError(request_id=self.attempt.request_id, code="timeout", message=message, retryable=True))

    def expire_if_queued_too_long(self, now: float, limit_s: float) -> None:
        """Ends a first attempt still waiting for an engine (in the source or a policy queue of the gateway)
        `limit_s` after it arrived (`now` on the wall clock) with a `queue_timeout` error: a 503, not retried, since
        the queue is what is slow, not an instance. One that reached an engine is left to its token deadlines."""
        attempt = self.attempt
        if self.done or attempt.retry or self._reached_engine or now - attempt.arrival_time <= limit_s:
            return
        if not self.core.take_back(attempt.request_id):
            self._reached_engine = True
            return
        message = f"waited {limit_s:g} s for an engine without reaching one (the server's --queue-timeout); retry later"
        self.deliver(RequestError(request_id=attempt.request_id, code="queue_timeout", message=message))

    def _as_client_sees(self, delta: TokenDelta) -> TokenDelta:
        self._token_ids += delta.token_ids
        self._text += delta.text
        self._text_events += bool(delta.text)
        self._text_without_ids |= bool(delta.text and not delta.token_ids)
        resumed = self.attempt is not self.request and self.attempt.prompt_token_ids is not None
        if delta.metrics is not None and resumed:  # the resume's prompt held tokens the client counts as output
            extra = len(self.attempt.prompt_token_ids) - len(self.request.prompt_token_ids or ())
            metrics = msgspec.structs.replace(delta.metrics, num_prompt_tokens=delta.metrics.num_prompt_tokens - extra)
            delta = msgspec.structs.replace(delta, metrics=metrics)
        return delta

    async def _retry(self, failure: RequestError) -> bool:
        """Starts the next attempt after `failure`; False when there is none to start."""
        if self.retries >= self.policy.max_retries or self.done:
            return False
        attempt = self._next_attempt()
        if attempt is None:
            return False
        registry, request = self.core.registry, self.request
        if not await registry.instance_ready(request.model, self.policy.retry_wait_s, request.phase):
            return False
        if self.done:  # the client left while it waited
            return False
        self.retries += 1
        resumed = bool(self._token_ids or self._text)
        self.core.count_retry(failure.code, resumed)
        log.warning(
            "request_retried", request_id=self.request.request_id, attempt=self.retries, code=failure.code,
            resumed_after_tokens=len(self._token_ids) or len(self._text), error=failure.message,
        )  # fmt: skip
        self.attempt = attempt
        self._progress_at = trio.current_time()
        return self.core.resubmit(self, attempt)

    def _next_attempt(self) -> Request | None:
        """The next attempt: the request again, or a resume from what the client got; None if it cannot resume."""
        first, previous = self.request, self.attempt
        exclude = list(dict.fromkeys([*previous.exclude, *([previous.instance] if previous.instance else [])]))
        phase = "embed" if first.phase == "embed" else "colocated"  # pd_split decides the rest anew
        fields: dict[str, Any] = dict(
            request_id=f"{first.request_id}.{self.retries + 1}", retry=self.retries + 1, exclude=exclude,
            instance=None, phase=phase, admitted_time=None, dispatched_time=None,
        )  # fmt: skip
        if self._text_without_ids and first.model is None:  # a replica that gave no token ids: where to resume is
            return None  # not known exactly
        # What the client got, in tokens: exactly when the prompt's tokens and every reply's are known (the graph's
        # model, or another served by our engines, whose files tokenized it), else, for another model's server, at
        # least one per event with text, so what is left of max_tokens is never cut short and never much exceeded.
        exact = first.prompt_token_ids is not None and not self._text_without_ids
        produced = len(self._token_ids) if exact else self._text_events
        if not produced:
            return msgspec.structs.replace(first, **fields)
        if exact:
            fields.update(prompt_token_ids=first.prompt_token_ids + self._token_ids, prompt=None, messages=None)
            fields.update(resumed_tokens=len(self._token_ids))  # the engine's text goes on from them
        elif first.model is not None and first.messages is None and first.prompt is not None:
            fields.update(prompt=first.prompt + self._text)
        else:
            return None
        sampling, budgets = first.sampling, {}  # max_tokens and min_tokens counted from where it resumes
        if sampling.max_tokens is not None:
            budgets["max_tokens"] = sampling.max_tokens - produced
            if budgets["max_tokens"] < 1:
                return None
        if sampling.min_tokens:
            budgets["min_tokens"] = max(0, sampling.min_tokens - produced)
        return msgspec.structs.replace(first, sampling=dataclasses.replace(sampling, **budgets), **fields)


def _worth_retrying(error: RequestError) -> bool:
    """An instance's failure that another attempt may not meet (shedding and the client's own errors are final)."""
    return error.retryable and error.code in RETRIED_CODES


async def embedded(streams: Sequence[ItemStream]) -> list[Embedding]:
    """Each input's vector, in order; the first input that fails cancels the rest and answers for all."""
    results: list[Embedding | None] = [None] * len(streams)
    failure: tuple[int, RequestError] | None = None

    async def wait(index: int, stream: ItemStream, scope: trio.CancelScope) -> None:
        nonlocal failure
        async for item in stream:
            if isinstance(item, RequestError):
                failure = failure or (index, item)
                scope.cancel()
                return
            if isinstance(item, Embedding):
                results[index] = item

    try:
        async with trio.open_nursery() as nursery:
            for index, stream in enumerate(streams):
                nursery.start_soon(wait, index, stream, nursery.cancel_scope)
    finally:
        for stream in streams:
            stream.cancel()  # no-op for those that ended; a client that left cancels the rest
    if failure is not None:
        index, error = failure
        numbered = msgspec.structs.replace(error, message=f"input {index}: {error.message}")
        raise api_error(numbered, param="input")
    return [r for r in results if r is not None]
