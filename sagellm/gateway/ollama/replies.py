"""Ollama's reply shapes: `/api/chat`'s messages and `/api/generate`'s responses, whole or as NDJSON lines, each
line a piece of the reply with `done: false` and the last one `done: true` with `done_reason` and Ollama's counts and
durations (nanoseconds: the whole request, loading, the prompt's evaluation, the generation); and its errors,
`{"error": "..."}` with the status."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from sagellm.gateway.http.app import Response
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.replies.choice import Choice
from sagellm.gateway.replies.events import ToolCall

NS = 1_000_000_000


def error_response(error: ApiError) -> Response:
    """A route's error as Ollama writes it; a model not served in Ollama's words, which clients match on."""
    message = error.message
    if error.code == "model_not_found":
        message = f"{message} (model not found, try pulling it first)"
    return Response({"error": message}, error.http_status, headers=error.headers)


def created_at(at: float | None = None) -> str:
    """A time as Ollama stamps its lines: RFC 3339 in UTC, with nanoseconds' digits."""
    moment = datetime.fromtimestamp(time.time() if at is None else at, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


def tool_call(call: ToolCall, index: int) -> dict[str, Any]:
    """A call as Ollama's messages hold it: the arguments an object, not JSON text."""
    try:
        arguments = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        arguments = {}
    return {"id": call.id, "function": {"index": index, "name": call.name, "arguments": arguments}}


def done_fields(choice: Choice | None) -> dict[str, Any]:
    """The last line's fields: why it ended, its token counts and durations."""
    metrics = choice.metrics if choice is not None else None
    reason = "length" if choice is not None and choice.finish_reason == "length" else "stop"
    fields: dict[str, Any] = {"done": True, "done_reason": reason}
    if metrics is None:
        return fields
    arrival, first, end = metrics.arrival_time, metrics.first_token_time, metrics.finished_time
    scheduled = metrics.first_scheduled_time or arrival
    return fields | {
        "total_duration": _ns(arrival, end),
        "load_duration": _ns(arrival, scheduled),
        "prompt_eval_count": metrics.num_prompt_tokens,
        "prompt_eval_duration": _ns(scheduled, first),
        "eval_count": len(choice.token_ids) or metrics.num_output_tokens if choice is not None else 0,
        "eval_duration": _ns(first, end),
    }


def _ns(start: float | None, end: float | None) -> int:
    return max(0, int((end - start) * NS)) if start is not None and end is not None else 0


class ChatLines:
    """`/api/chat`'s lines: each the assistant message's next piece (text, thinking or its tool calls)."""

    def __init__(self, model: str) -> None:
        self.model, self.calls = model, 0

    def line(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model, "created_at": created_at(), "message": {"role": "assistant", **message},
                "done": False}  # fmt: skip

    def text(self, text: str) -> list[dict[str, Any]]:
        return [self.line({"content": text})]

    def thinking(self, text: str) -> list[dict[str, Any]]:
        return [self.line({"content": "", "thinking": text})]

    def call(self, call: ToolCall) -> list[dict[str, Any]]:
        self.calls += 1
        return [self.line({"content": "", "tool_calls": [tool_call(call, self.calls - 1)]})]

    def last(self, choice: Choice | None) -> dict[str, Any]:
        return {**self.line({"content": ""}), **done_fields(choice)}

    def whole(self, choice: Choice, thinking: str | None, content: str | None, calls: list[ToolCall]) -> dict[str, Any]:
        message: dict[str, Any] = {"content": content or ""}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = [tool_call(call, i) for i, call in enumerate(calls)]
        return {**self.line(message), **done_fields(choice)}


class GenerateLines:
    """`/api/generate`'s lines: each the response's next piece of text (or thinking)."""

    def __init__(self, model: str) -> None:
        self.model = model

    def line(self, response: str, thinking: str | None = None) -> dict[str, Any]:
        line = {"model": self.model, "created_at": created_at(), "response": response, "done": False}
        return line | ({"thinking": thinking} if thinking else {})

    def text(self, text: str) -> list[dict[str, Any]]:
        return [self.line(text)]

    def thinking(self, text: str) -> list[dict[str, Any]]:
        return [self.line("", text)]

    def call(self, call: ToolCall) -> list[dict[str, Any]]:  # a generate request has no tools
        return []

    def last(self, choice: Choice | None) -> dict[str, Any]:
        return {**self.line(""), **done_fields(choice)}

    def whole(self, choice: Choice, thinking: str | None, content: str | None) -> dict[str, Any]:
        return {**self.line(content or "", thinking), **done_fields(choice)}
