"""The Messages API's reply shapes: the message, its streamed events, its usage and its errors.

A stream is `message_start`, `ping`, then each content block as `content_block_start`, its deltas (`text_delta`, or
one `input_json_delta` holding a tool call's whole input) and `content_block_stop`, then `message_delta` (the stop
reason and the usage) and `message_stop`; a failure after the start is an `error` event. Usage counts a prompt's
prefix-cache hits as `cache_read_input_tokens` and the rest as `input_tokens`, as Anthropic's prompt caching does."""

from __future__ import annotations

import json
import secrets
from typing import Any

from sagellm.gateway.http.app import NamedEvent, Response
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.replies.choice import Choice
from sagellm.gateway.replies.events import ToolCall

# HTTP status -> Anthropic's error type (anything else over 500 is an api_error)
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(error: ApiError) -> Response:
    """A route's error in Anthropic's shape, with its status and headers (`Retry-After` on a 429). A prompt over the
    context opens with Anthropic's words for it, "prompt is too long", which agents act on (Claude Code compacts)."""
    message = error.message
    if error.code == "context_length_exceeded":
        message = f"prompt is too long: {message}"
    return Response(error_body(error.http_status, message), error.http_status, headers=error.headers)


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def tool_use_id(call: ToolCall) -> str:
    """A call's id in Anthropic's shape (`toolu_...`), made from the parser's so a stream and its end agree."""
    return "toolu_" + call.id.removeprefix("call_")


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    try:
        arguments = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        arguments = {}
    return {"type": "tool_use", "id": tool_use_id(call), "name": call.name, "input": arguments}


def content_blocks(thinking: str | None, text: str | None, calls: list[ToolCall]) -> list[dict[str, Any]]:
    """A reply's blocks: its thinking (no signature: nothing here signs it), its text, its tool calls."""
    blocks = [{"type": "thinking", "thinking": thinking, "signature": ""}] if thinking else []
    blocks += [{"type": "text", "text": text}] if text else []
    return blocks + [tool_use_block(call) for call in calls]


def usage(choice: Choice | None) -> dict[str, int]:
    metrics = choice.metrics if choice is not None else None
    prompt = metrics.num_prompt_tokens if metrics else 0
    cached = metrics.num_cached_tokens if metrics else 0
    output = (len(choice.token_ids) or (metrics.num_output_tokens if metrics else 0)) if choice is not None else 0
    return {
        "input_tokens": prompt - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": output,
    }


def stop(choice: Choice, calls: list[ToolCall], stop_sequences: list[str] | None) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished reply."""
    if calls:
        return "tool_use", None
    if choice.finish_reason == "length":
        return "max_tokens", None
    if isinstance(choice.stop_reason, str) and choice.stop_reason in (stop_sequences or ()):
        return "stop_sequence", choice.stop_reason
    return "end_turn", None


def message_body(
    message_id: str, model: str, content: list[dict[str, Any]], stop_reason: str | None, stop_sequence: str | None,
    usage_: dict[str, int],
) -> dict[str, Any]:  # fmt: skip
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage_,
    }


class MessageEvents:
    """A streamed message's events, in order: each call returns the named events to send next."""

    def __init__(self, message_id: str, model: str) -> None:
        self.message_id, self.model = message_id, model
        self.blocks = 0  # content blocks ended
        self.open: str | None = None  # the kind of block open now: "thinking" or "text"

    def start(self) -> list[NamedEvent]:
        empty = {"input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 0}
        message = message_body(self.message_id, self.model, [], None, None, empty)
        return [_event("message_start", message=message), _event("ping")]

    def thinking(self, text: str) -> list[NamedEvent]:
        opening = {"type": "thinking", "thinking": "", "signature": ""}
        return self._into("thinking", opening, {"type": "thinking_delta", "thinking": text})

    def text(self, text: str) -> list[NamedEvent]:
        return self._into("text", {"type": "text", "text": ""}, {"type": "text_delta", "text": text})

    def _into(self, kind: str, opening: dict[str, Any], delta: dict[str, Any]) -> list[NamedEvent]:
        """A delta of a `kind` block: the open block's, or a new one's after closing another kind's."""
        events = []
        if self.open != kind:
            events += self._close()
            events.append(_event("content_block_start", index=self.blocks, content_block=opening))
            self.open = kind
        return events + [_event("content_block_delta", index=self.blocks, delta=delta)]

    def call(self, call: ToolCall) -> list[NamedEvent]:
        events = self._close()
        block = tool_use_block(call)
        opening = {**block, "input": {}}
        partial = {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}
        events += [
            _event("content_block_start", index=self.blocks, content_block=opening),
            _event("content_block_delta", index=self.blocks, delta=partial),
            _event("content_block_stop", index=self.blocks),
        ]
        self.blocks += 1
        return events

    def finish(self, stop_reason: str, stop_sequence: str | None, usage_: dict[str, int]) -> list[NamedEvent]:
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        return [*self._close(), _event("message_delta", delta=delta, usage=usage_), _event("message_stop")]

    def _close(self) -> list[NamedEvent]:
        if self.open is None:
            return []
        self.open = None
        self.blocks += 1
        return [_event("content_block_stop", index=self.blocks - 1)]


def _event(kind: str, **fields: Any) -> NamedEvent:
    return NamedEvent(kind, {"type": kind, **fields})
