"""The admission operator: the graph's front door, which decides whether a request may enter at all.

It rejects as items (never raises) so a rejection reaches the sinks like any other terminal: `overloaded` when the graph
already holds `max_queue` requests (or `max_tokens_in_flight` tokens), `rate_limited` when a user exceeds their token
bucket, `invalid_request` for an empty or untokenizable prompt or token ids outside the vocabulary (the prompt's, or
those its `logit_bias` and `allowed_token_ids` name), and
`context_length_exceeded` when prompt plus completion cannot fit the model's context. A refusal says when to retry
(`retry_after_s`): when the requests in flight, and the clients already told to come back, will have been served at
the rate requests have lately ended. With
`ttft_slo_ms` the in-flight bound also adapts to that target (`SloLimit`): fewer requests are let in while first
tokens come near it, so the ones admitted under overload still get their first token in time and the rest are shed at
once with a 429 rather than queued past it. The cheap O(1) load checks run first, so an overloaded server spends no
tokenizer time on requests it would shed anyway. At the gateway the whole admission runs at its door (`admit_group`):
a client's request, of one prompt or several, is admitted or refused whole on arrival, and the graph's node lets
what the door admitted through (admission happens once). Admitted requests leave with `prompt_token_ids` filled in
(the engines never tokenize) and `admitted_time` stamped. A request for another model
(`Request.model` set: instances the gateway attached serve it) is tokenized and checked with that model's own files
when the gateway handed them in (`models`: its engines are workers that take tokens), and otherwise only load-checked
(its server tokenizes and checks it).

What it learns of the graph's model at `open()` (`served_model`, loaded once per process): its tokenizer, used when a
request carries text but no token ids; its vocabulary; and the context the engines serve (their `max_model_len`, else
the model's), unless `max_model_len` is set here. Tests hand in a `ServedModel` (graph attribute `served_model`), and
replace the `clock` attribute (wall clock by default) before `open()`: it is an attribute, not a parameter, so YAML
and the DSL never see it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar

from sagellm.common.errors import FieldError
from sagellm.runtime.engine.penalties import bad_word_token_ids
from sagellm.runtime.engine.prompt import request_token_problem
from sagellm.runtime.models.tokenizer import encode_prompt
from sagellm.runtime.pipeline.messages import ErrorCode, Request, RequestError
from sagellm.runtime.pipeline.operator import MapOperator, OperatorContext, PipelineLoad, register_operator
from sagellm.runtime.pipeline.served_model import ServedModel, served_model

MAX_RETRY_AFTER_S = 60.0  # a client told to wait longer would rather be told to go elsewhere
_PRUNE_AT = 10_000  # buckets kept before refilled (idle) users' buckets are forgotten


class SloLimit:
    """An in-flight bound that keeps time to first token within `target_s`: additive increase, multiplicative
    decrease (as TCP and Envoy's adaptive concurrency), on the executor's record (`PipelineLoad`): the first-token
    times of the latest requests, and the arrival of the oldest one still waiting for its first token.

    A request waiting longer than `margin` of the target cuts the bound by `backoff` at once (at most once per
    `margin` of the target: the queue shrinks before requests miss it, not after they finished late). Otherwise the
    bound is judged once per `window` new first tokens by the slowest of them: over the margin, cut; under half of
    it, a quarter more (at least one: quick recovery after a burst); in between, one more (probing near the target).
    Never above `ceiling`, nor below the `floor` an update is given (the engines' slots: a request let in up to them
    starts at once, so a bound under them idles an engine without shortening any wait), nor below 1."""

    def __init__(
        self, ceiling: int, target_s: float, window: int = 8, margin: float = 0.7, backoff: float = 0.75
    ) -> None:
        self.ceiling, self.target_s, self.window, self.margin, self.backoff = ceiling, target_s, window, margin, backoff
        self.bound = float(ceiling)
        self._seen = 0  # `ttfts_seen` when last judged
        self._cut_at = float("-inf")

    def update(self, load: PipelineLoad, now: float, floor: int = 1) -> int:
        """The bound now (`now`: the wall clock `Request.arrival_time` is on; `floor`: the engines' slots)."""
        limit_s = self.margin * self.target_s
        new = load.ttfts_seen - self._seen
        if load.oldest_waiting is not None and now - load.oldest_waiting > limit_s and now - self._cut_at > limit_s:
            self._cut(load, now)
        elif new >= self.window:
            slowest = max(list(load.recent_ttfts)[-min(new, len(load.recent_ttfts)) :])
            if slowest > limit_s:
                self._cut(load, now)
            else:
                self._seen = load.ttfts_seen
                self.bound += max(1.0, self.bound / 4) if slowest < limit_s / 2 else 1.0
                self.bound = min(float(self.ceiling), self.bound)
        self.bound = max(float(min(floor, self.ceiling)), self.bound)
        return int(self.bound)

    def _cut(self, load: PipelineLoad, now: float) -> None:
        self.bound = max(1.0, self.bound * self.backoff)
        self._cut_at, self._seen = now, load.ttfts_seen


def tokenize_request(request: Request, tokenizer: Any, vocab_size: int | None) -> str | None:
    """Fills `prompt_token_ids` (rendering chat `messages` with the model's template first) and the bad words' token
    ids when missing; returns what is wrong with the prompt or the token ids its sampling names, if anything.
    Admission does it for every request that arrives as text; a front end that can wait in a thread (the gateway,
    for a long prompt or many bad words) does it before, so the event loop never does."""
    if request.prompt_token_ids is None and request.prompt is None and request.messages:
        if tokenizer is None:
            return "no tokenizer is loaded to render the chat messages: send prompt_token_ids instead"
        try:
            request.prompt = tokenizer.apply_chat_template(
                request.messages,
                tools=request.tools,
                chat_template=request.chat_template,
                tokenize=False,
                **({"add_generation_prompt": True} | (request.template_kwargs or {})),
            )
        except Exception as exc:  # a template error names what is wrong with the messages
            return f"messages cannot be rendered with the model's chat template: {exc}"
    if request.prompt_token_ids is None:
        if not request.prompt:
            return "prompt is empty: give a prompt or prompt_token_ids"
        if tokenizer is None:
            return "no tokenizer is loaded to tokenize the prompt: send prompt_token_ids instead"
        request.prompt_token_ids = encode_prompt(tokenizer, request.prompt)
    sampling = request.sampling
    if sampling.bad_words and sampling.bad_words_token_ids is None and tokenizer is not None and vocab_size:
        try:
            sampling.bad_words_token_ids = bad_word_token_ids(tokenizer, sampling.bad_words, vocab_size)
        except FieldError as error:  # a word with no tokens
            return str(error)
    return request_token_problem(request.prompt_token_ids, sampling, vocab_size)


class RecentCount:
    """Events counted per whole second over the last `span_s` seconds: a ring of buckets, O(span) memory."""

    def __init__(self, span_s: int) -> None:
        self._counts = [0] * span_s
        self._seconds = [-1] * span_s

    def add(self, now: float, count: int = 1) -> None:
        second = int(now)
        slot = second % len(self._counts)
        if self._seconds[slot] != second:
            self._seconds[slot], self._counts[slot] = second, 0
        self._counts[slot] += count

    def since(self, start: float) -> int:
        """The events from `start` on (whole seconds: the one `start` falls in counts)."""
        first = int(start)
        return sum(c for s, c in zip(self._seconds, self._counts) if s >= first)


@register_operator
class Admission(MapOperator):
    """Load shedding, per-user rate limiting, tokenization and request validation, in that order."""

    name = "admission"
    accepts = (Request,)
    traced = False  # a traced request came through the gateway, whose door's checks are its admission span
    parameter_help: ClassVar[dict[str, str]] = {
        "max_queue": "most requests in flight in the graph; more are refused as overloaded",
        "max_model_len": "context length prompts are checked against (default: the engines', else the model's)",
        "rate_limit_per_user": "sustained requests/s per user, requests without one sharing a bucket (default: none)",
        "burst": "requests a user may send at once above the rate limit",
        "ttft_slo_ms": "time-to-first-token target of requests that set none; the bound adapts to keep it",
        "max_tokens_in_flight": "bound in tokens, each request counting its prompt and completion (default: none)",
    }

    def __init__(
        self,
        max_queue: int = 1024,
        max_model_len: int | None = None,
        rate_limit_per_user: float | None = None,
        burst: int = 10,
        ttft_slo_ms: float | None = None,
        max_tokens_in_flight: int | None = None,
    ) -> None:
        """The parameters are `parameter_help`'s; without `ttft_slo_ms` the bound is `max_queue`, fixed."""
        if max_queue < 1:
            raise FieldError("max_queue", f"admission: max_queue must be >= 1, got {max_queue}")
        if max_model_len is not None and max_model_len < 1:
            raise FieldError("max_model_len", f"admission: max_model_len must be >= 1 or unset, got {max_model_len}")
        if rate_limit_per_user is not None and not rate_limit_per_user > 0:
            raise FieldError(
                "rate_limit_per_user", f"admission: rate_limit_per_user must be > 0 or unset, got {rate_limit_per_user}"
            )
        if burst < 1:
            raise FieldError("burst", f"admission: burst must be >= 1, got {burst}")
        if ttft_slo_ms is not None and not ttft_slo_ms > 0:
            raise FieldError("ttft_slo_ms", f"admission: ttft_slo_ms must be > 0 or unset, got {ttft_slo_ms}")
        if max_tokens_in_flight is not None and max_tokens_in_flight < 1:
            message = f"admission: max_tokens_in_flight must be >= 1 or unset, got {max_tokens_in_flight}"
            raise FieldError("max_tokens_in_flight", message)
        self.max_queue = max_queue
        self.max_model_len = max_model_len
        self.rate_limit_per_user = rate_limit_per_user
        self.burst = burst
        self.ttft_slo_ms = ttft_slo_ms
        self.max_tokens_in_flight = max_tokens_in_flight
        self.limit = SloLimit(max_queue, ttft_slo_ms / 1000) if ttft_slo_ms is not None else None
        self.clock: Callable[[], float] = time.time
        self.tokenizer: Any = None
        self.vocab_size: int | None = None
        self.models: dict[str, ServedModel] = {}  # other models' front-end files, whose engines need tokens
        self._buckets: dict[str | None, tuple[float, float]] = {}  # user -> (tokens left, when last refilled)
        self._refused = RecentCount(int(MAX_RETRY_AFTER_S) + 1)  # refusals for load, by second
        self._retry_after_s = 1.0  # the last Retry-After given

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        model = served_model(ctx.graph_attrs)
        if model is None:
            return
        self.tokenizer, self.vocab_size = model.tokenizer, model.vocab_size
        if self.max_model_len is None:
            self.max_model_len = model.max_model_len

    def execute(self, item: Request) -> Request | RequestError:
        if item.admitted_time is not None:  # admitted at the gateway's door (`admit_group`): once is enough
            return item
        bound = self._bound_now()
        # The count includes this request (the source counted it). A retry was admitted once and may hold a client's
        # half-streamed answer: shedding it now would lose work the load bound was there to protect.
        if self.ctx.load.in_flight > bound and not item.retry:
            why = "" if bound == self.max_queue else f", fewer than {self.max_queue} while requests miss their TTFT SLO"
            return self._shed(item, f"server is at capacity ({bound} requests in flight{why})")
        return self._admit(item)

    def _admit(self, item: Request) -> Request | RequestError:
        """A request's own checks, once the load allows it: its user's rate, its prompt's tokens, its context, the
        bound in tokens."""
        if item.ttft_slo_ms is None and self.ttft_slo_ms is not None:
            item.ttft_slo_ms = self.ttft_slo_ms
        if self.rate_limit_per_user is not None and not item.retry and not self._take_token(item.user):
            return self._reject(
                item, "rate_limited", f"user {item.user!r} exceeds {self.rate_limit_per_user:g} requests/s"
            )
        if item.model is None:
            tokenizer, vocab_size, limit = self.tokenizer, self.vocab_size, self.max_model_len
        elif item.model in self.models:  # another model whose engine takes tokens: tokenized here with its tokenizer
            other = self.models[item.model]
            tokenizer, vocab_size, limit = other.tokenizer, other.vocab_size, other.max_model_len
        else:  # a server's model: the server tokenizes and checks it
            item.admitted_time = self.clock()
            return item
        problem = tokenize_request(item, tokenizer, vocab_size)
        if problem is not None:
            return self._reject(item, "invalid_request", problem)
        completion = item.sampling.max_tokens or 1
        total = item.num_prompt_tokens + completion
        if limit is not None and total > limit:
            return self._reject(
                item,
                "context_length_exceeded",
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{total} tokens ({item.num_prompt_tokens} in the messages, {completion} in the completion). "
                "Please reduce the length of the messages or completion.",
            )
        refusal = self._check_tokens(item, total)
        if refusal is not None:
            return refusal
        item.admitted_time = self.clock()
        return item

    def _check_tokens(self, item: Request, total: int) -> RequestError | None:
        """The bound in tokens: a request's prompt and completion bound (`total`) join those in flight only while
        their sum stays within `max_tokens_in_flight`; one that alone exceeds it can never run (a 400)."""
        bound, load = self.max_tokens_in_flight, self.ctx.load
        if bound is not None and not item.retry:
            if total > bound:
                message = f"the request needs {total} tokens, more than the server holds at once ({bound})"
                return self._reject(item, "invalid_request", message)
            if load.tokens_in_flight + total > bound:
                message = f"server is at capacity ({load.tokens_in_flight} of {bound} tokens in flight)"
                return self._shed(item, message)
        load.admit_tokens(item.request_id, total)
        return None

    def admit_group(self, requests: list[Request], waiting: int) -> RequestError | None:
        """A client's request of one or more prompts (`requests`) is admitted or refused as a whole, on arrival,
        before any prompt enters: refused when it can never fit the bound, or does not fit it now with `waiting`
        requests submitted ahead of it that have not entered yet, or when any prompt fails its own checks (what the
        others took is given back); None when all are admitted (stamped: `execute` lets them through). Under overload
        most arrivals are refused, and a refusal here costs none of the graph's hops."""
        count, first = len(requests), requests[0]
        if count > self.max_queue:
            message = f"prompt: {count} prompts in one request are more than the server holds ({self.max_queue})"
            return self._reject(first, "invalid_request", message)
        room = self._bound_now() - self.ctx.load.in_flight - waiting
        if count > room:
            message = f"server is at capacity: room for {max(room, 0)} requests, not {count}"
            return self._shed(first, message, count)
        for i, request in enumerate(requests):
            admitted = self._admit(request)
            if isinstance(admitted, RequestError):
                self.give_back(requests[:i])
                return admitted
        return None

    def give_back(self, requests: list[Request]) -> None:
        """Undoes `_admit` for admitted prompts of a group refused after all (by another prompt, or another
        admission node): their tokens in flight, the tokens they took from their users' buckets, their stamps."""
        for request in requests:
            self.ctx.load.release_tokens(request.request_id)
            if self.rate_limit_per_user is not None and not request.retry:
                tokens, last = self._buckets[request.user]
                self._buckets[request.user] = (tokens + 1.0, last)
            request.admitted_time = None

    def retry_after_s(self, count: int = 1) -> float:
        """The `Retry-After` of a refusal of `count` requests: once the requests in flight and the clients already
        told to come back (those refused within the last Retry-After) will have been served at the rate requests
        lately ended. A virtual queue outside the server: a crowd's retries come back at the pace the server serves
        them, not all at once each second (a crowd retrying every second takes the CPU the admitted requests need,
        and an overload becomes a collapse). From a second (also while the rate is not known) to MAX_RETRY_AFTER_S."""
        now = self.clock()
        ahead = self.ctx.load.in_flight + self._refused.since(now - self._retry_after_s)
        self._refused.add(now, count)
        drain = self.ctx.load.drain_s(ahead, now)
        self._retry_after_s = min(MAX_RETRY_AFTER_S, max(1.0, drain or 1.0))
        return self._retry_after_s

    def _engine_slots(self) -> int:
        """Requests the healthy engines that decode run at once (a request holds one of them until it ends)."""
        return sum(s.max_running for s in self.ctx.instances.values() if s.healthy and s.role != "prefill")

    def bound(self) -> int:
        """Requests let be in flight now: `max_queue`, or less while a TTFT SLO is being kept."""
        return self.max_queue if self.limit is None else int(self.limit.bound)

    def _bound_now(self) -> int:
        """The bound, the TTFT SLO's first brought up to date with the graph's record."""
        if self.limit is not None:
            self.limit.update(self.ctx.load, self.clock(), self._engine_slots())
        return self.bound()

    def _take_token(self, user: str | None) -> bool:
        """Token bucket: `burst` tokens, refilled at `rate_limit_per_user`/s; a request takes one."""
        rate, now = self.rate_limit_per_user, self.clock()
        tokens, last = self._buckets.get(user, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * rate)
        allowed = tokens >= 1.0
        self._buckets[user] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > _PRUNE_AT:
            self._forget_idle_users(now)
        return allowed

    def _forget_idle_users(self, now: float) -> None:
        """A bucket refilled to `burst` is the same as no bucket, so dropping it bounds memory without effect."""
        rate = self.rate_limit_per_user
        self._buckets = {
            user: (tokens, last)
            for user, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * rate < self.burst
        }

    def _shed(self, request: Request, message: str, count: int = 1) -> RequestError:
        """An `overloaded` refusal of `count` requests, with when to retry (`retry_after_s`)."""
        error = self._reject(request, "overloaded", message)
        error.retry_after_s = self.retry_after_s(count)
        return error

    def _reject(self, request: Request, code: ErrorCode, message: str) -> RequestError:
        retryable = code in ("overloaded", "rate_limited")
        return RequestError(
            request_id=request.request_id, code=code, message=message, retryable=retryable, time=self.clock()
        )
