"""Where requests enter a pipeline: a fixed list of prompts, a JSON-lines file, or standard input.

The file and stdin sources share one line format and one decoder (`decode_request_line`), so a request written to a
file behaves exactly like the same line piped in. A bad line never stops the pipeline: it becomes a `RequestError`
(`invalid_request`, message `FILE:LINE: why`) that flows to the sinks like any other reply, so a batch job reports
every bad line and still serves the good ones. Each source hands out unique request ids (the executor tracks work by
id), generating `{id_prefix}{n}` for lines that do not name their own; give sources of one graph distinct prefixes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import IO, Annotated, Any, ClassVar

import msgspec

from sagellm.common.errors import InvalidInput, users_file
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.pipeline.messages import Priority, Request, RequestError, TokenId
from sagellm.runtime.pipeline.operator import OperatorContext, SourceOperator, register_operator
from sagellm.runtime.pipeline.served_model import served_model

Positive = Annotated[float, msgspec.Meta(gt=0)]
_UNSET = msgspec.UNSET


class RequestLine(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One JSON line of a request file: unknown keys are errors, so a typo (`max_token`) is reported, not ignored.

    Sampling fields left out take the source's defaults; `deadline_s` is relative to the time the line is read."""

    prompt: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    prompt_token_ids: Annotated[list[TokenId], msgspec.Meta(min_length=1)] | None = None
    messages: Annotated[list[dict[str, Any]], msgspec.Meta(min_length=1)] | None = None  # chat, OpenAI-style
    request_id: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    max_tokens: int | None | msgspec.UnsetType = _UNSET
    temperature: float | msgspec.UnsetType = _UNSET
    top_p: float | msgspec.UnsetType = _UNSET
    top_k: int | msgspec.UnsetType = _UNSET
    min_p: float | msgspec.UnsetType = _UNSET
    seed: int | None | msgspec.UnsetType = _UNSET
    stop: str | list[str] | None | msgspec.UnsetType = _UNSET
    stop_token_ids: list[int] | msgspec.UnsetType = _UNSET
    ignore_eos: bool | msgspec.UnsetType = _UNSET
    logprobs: int | None | msgspec.UnsetType = _UNSET
    prompt_logprobs: int | None | msgspec.UnsetType = _UNSET
    guided: dict[str, Any] | None | msgspec.UnsetType = _UNSET  # GuidedDecoding's fields: {"json": {...}}, ...
    presence_penalty: float | msgspec.UnsetType = _UNSET
    frequency_penalty: float | msgspec.UnsetType = _UNSET
    repetition_penalty: float | msgspec.UnsetType = _UNSET
    logit_bias: dict[str, float] | None | msgspec.UnsetType = _UNSET
    min_tokens: int | msgspec.UnsetType = _UNSET
    bad_words: list[str] | None | msgspec.UnsetType = _UNSET
    allowed_token_ids: list[int] | None | msgspec.UnsetType = _UNSET
    priority: Priority = 0
    user: str | None = None
    ttft_slo_ms: Positive | None = None
    tpot_slo_ms: Positive | None = None
    deadline_s: Positive | None = None
    cost_budget: Annotated[float, msgspec.Meta(ge=0)] | None = None


_SAMPLING_FIELDS = tuple(f for f in RequestLine.__struct_fields__ if f in SamplingParams.__dataclass_fields__)


def decode_request_line(
    line: str | bytes, *, new_id: Callable[[], str], defaults: dict[str, Any], now: float
) -> Request:
    """A request from one JSON line; `new_id()` names it when the line does not. Raises ValueError (msgspec's
    decode/validation errors and SamplingParams' range errors are ValueErrors) with a message naming the field."""
    spec = msgspec.json.decode(line, type=RequestLine)
    if sum(x is not None for x in (spec.prompt, spec.prompt_token_ids, spec.messages)) != 1:
        raise InvalidInput("a request needs exactly one of `prompt`, `prompt_token_ids` or `messages`")
    given = {f: getattr(spec, f) for f in _SAMPLING_FIELDS if getattr(spec, f) is not _UNSET}
    sampling = SamplingParams(**(defaults | given))
    return Request(
        request_id=spec.request_id or new_id(),
        prompt=spec.prompt,
        prompt_token_ids=spec.prompt_token_ids,
        messages=spec.messages,
        sampling=sampling,
        priority=spec.priority,
        user=spec.user,
        ttft_slo_ms=spec.ttft_slo_ms,
        tpot_slo_ms=spec.tpot_slo_ms,
        deadline=None if spec.deadline_s is None else now + spec.deadline_s,
        cost_budget=spec.cost_budget,
        arrival_time=now,
    )


@register_operator
class PromptSource(SourceOperator):
    """A fixed list of prompts, all released at once on the first poll (the offline `generate` workload)."""

    name = "prompt_source"
    parameter_help: ClassVar[dict[str, str]] = {
        "prompts": "the prompts, one request each (`sagellm run --prompt` fills it)",
        "max_tokens": "each request's max_tokens (default: up to the context)",
        "temperature": "each request's temperature, 0 = greedy (default: the model's)",
        "top_p": "each request's top_p (default: the model's)",
        "seed": "each request's sampling seed (default: none)",
        "ignore_eos": "generate past the end-of-sequence token, up to max_tokens",
        "priority": "each request's priority, lower first (the priority policy reads it)",
        "user": "each request's user (admission's per-user rate limit reads it)",
        "id_prefix": "request ids are this and a number; give sources of one graph distinct ones",
        "chat": "each prompt is a user message in the model's chat template; false completes the raw text",
    }

    def __init__(
        self,
        prompts: list[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        ignore_eos: bool = False,
        priority: int = 0,
        user: str | None = None,
        id_prefix: str = "req-",
        chat: bool = True,
    ) -> None:
        """`chat`: each prompt is a user message, rendered with the model's chat template (instruct models answer
        it); False completes the raw text. Sampling fields left None take the model's defaults (SamplingParams)."""
        self.prompts = list(prompts or [])
        self.chat = chat
        given = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, ignore_eos=ignore_eos)
        self.given = {k: v for k, v in given.items() if v is not None}
        # Built here too, so a bad value fails when the graph is built, not when the first request flows.
        self.sampling = SamplingParams.with_defaults(None, **self.given)
        self.priority, self.user, self.id_prefix = priority, user, id_prefix
        self.clock: Callable[[], float] = time.time
        self._released = False

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        self.sampling = SamplingParams.with_defaults(_sampling_defaults(ctx), **self.given)

    def poll(self) -> list[Request] | None:
        if self._released:
            return None
        self._released = True
        now = self.clock()
        return [
            Request(
                request_id=f"{self.id_prefix}{i}",
                prompt=None if self.chat else prompt,
                messages=[{"role": "user", "content": prompt}] if self.chat else None,
                sampling=replace(self.sampling),  # a copy each (lists too): requests must not share state
                priority=self.priority,
                user=self.user,
                arrival_time=now,
            )
            for i, prompt in enumerate(self.prompts)
        ]


class _LineSource(SourceOperator):
    """Reads `chunk_lines` lines per poll from `self.stream` and turns each non-blank one into a Request or an error."""

    parameter_help: ClassVar[dict[str, str]] = {
        "max_tokens": "max_tokens of the requests that set none (default: up to the context)",
        "temperature": "temperature of the requests that set none (default: the model's)",
        "id_prefix": "ids of requests that name none are this and a number; give sources of one graph distinct ones",
    }

    where = ""  # how error messages name the input
    chunk_lines = 64

    def __init__(self, max_tokens: int | None, temperature: float | None, id_prefix: str) -> None:
        given = {k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature)) if v is not None}
        SamplingParams.with_defaults(None, **given)  # fail at build time on bad defaults
        self.given = given
        self.defaults: dict[str, Any] = dict(given)  # the model's defaults join them at open()
        self.id_prefix = id_prefix
        self.clock: Callable[[], float] = time.time
        self.stream: IO[Any] | None = None
        self._line_no = 0
        self._next_id = 0
        self._seen: set[str] = set()
        self._exhausted = False

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        self.defaults = {**(_sampling_defaults(ctx) or {}), **self.given}

    def poll(self) -> list[Request | RequestError] | None:
        if self._exhausted or self.stream is None:
            return None
        items: list[Request | RequestError] = []
        for _ in range(self.chunk_lines):
            line = self.stream.readline()
            if not line:
                self._exhausted = True
                break
            self._line_no += 1
            if line.strip():
                items.append(self._item(line))
        return items if items or not self._exhausted else None

    def _item(self, line: str | bytes) -> Request | RequestError:
        request: Request | RequestError
        try:
            request = self._decode(line, self.clock())
            if request.request_id in self._seen:
                raise InvalidInput(f"request_id {request.request_id!r} was already used")
        except ValueError as exc:
            message = f"{self.where}:{self._line_no}: {exc}"
            request = RequestError(request_id=self._fresh_id(), code="invalid_request", message=message)
        self._seen.add(request.request_id)
        return request

    def _decode(self, line: str | bytes, now: float) -> Request:
        return decode_request_line(line, new_id=self._fresh_id, defaults=self.defaults, now=now)

    def _fresh_id(self) -> str:
        """The next generated id no line has taken (a line may have named its request `req-3` before we got there)."""
        while (candidate := f"{self.id_prefix}{self._next_id}") in self._seen:
            self._next_id += 1
        self._next_id += 1
        return candidate


@register_operator
class JsonlSource(_LineSource):
    """Requests from a JSON-lines file (one `RequestLine` object per line), read lazily so big files stream."""

    name = "jsonl_source"
    parameter_help: ClassVar[dict[str, str]] = {
        "path": "the JSON-lines file of requests, one object per line",
        **_LineSource.parameter_help,
    }

    def __init__(
        self, path: str, max_tokens: int | None = None, temperature: float | None = None, id_prefix: str = "req-"
    ) -> None:
        super().__init__(max_tokens, temperature, id_prefix)
        self.path = path
        self.where = path

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        # Bytes: msgspec decodes them without a str copy. Closed in close(): the file outlives this call.
        with users_file(self.path, "read the requests"):
            self.stream = open(self.path, "rb")  # noqa: SIM115

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


@register_operator
class StdinSource(_LineSource):
    """Requests typed or piped on standard input: JSON lines as in `jsonl_source`, any other line is a prompt.

    `readline` blocks, so the executor polls it off the event loop; one line per poll keeps an interactive session
    answering each line as it is entered."""

    name = "stdin_source"
    blocking = True
    chunk_lines = 1
    where = "<stdin>"

    def __init__(
        self, max_tokens: int | None = None, temperature: float | None = None, id_prefix: str = "req-"
    ) -> None:
        super().__init__(max_tokens, temperature, id_prefix)

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        if self.stream is None:  # tests assign a StringIO before open
            self.stream = sys.stdin

    def _decode(self, line: str | bytes, now: float) -> Request:
        """A line that is not a JSON object is a plain prompt, as it stands but for its line break."""
        text = line.decode() if isinstance(line, bytes) else line
        if text.lstrip().startswith("{"):
            return super()._decode(text, now)
        sampling = SamplingParams(**self.defaults)
        return Request(request_id=self._fresh_id(), prompt=text.rstrip("\r\n"), sampling=sampling, arrival_time=now)


def _sampling_defaults(ctx: OperatorContext) -> dict[str, Any] | None:
    """The graph's model's own sampling defaults: what the sources' requests leave unset takes."""
    model = served_model(ctx.graph_attrs)
    return model.sampling_defaults if model is not None else None
