"""The typed event stream of a streamed response, as OpenAI's SDKs and Codex read it: `response.created` and
`response.in_progress`, the output as it comes, and always one last event that says how it ended:
`response.completed`, `response.incomplete` (cut by max_output_tokens) or `response.failed` (the response with
`status: "failed"` and its `error`). A client like Codex treats a stream that ends without one as broken and retries
it, so a failure after the stream started is a `response.failed`, never a bare `error` event."""

from __future__ import annotations

from typing import Any

from sagellm.gateway.openai.responses.protocol import call_item, message_item
from sagellm.gateway.replies.events import ToolCall

# A failed request's code (`sagellm.runtime.pipeline.messages.HTTP_STATUS`) as the Responses API's `error.code`,
# the words clients act on: Codex gives up on `context_length_exceeded`, waits and retries on the others.
RESPONSE_ERROR_CODES = {
    "context_length_exceeded": "context_length_exceeded",
    "invalid_request": "invalid_prompt",
    "overloaded": "rate_limit_exceeded",
    "rate_limited": "rate_limit_exceeded",
}


def response_error(code: str | None, message: str) -> dict[str, str]:
    """A failed response's `error`: OpenAI's code for ours (`server_error` for any failure of the server's)."""
    return {"code": RESPONSE_ERROR_CODES.get(code or "", "server_error"), "message": message}


class ResponseEvents:
    """The typed events of a streamed response, numbered (`sequence_number`) as they are made: the response's
    creation, its text as `response.output_text.delta`s of one message item, each call as a function_call item whose
    arguments come in one `response.function_call_arguments.delta`, and `response.completed` (or `.incomplete`, or
    `.failed`)."""

    def __init__(self, snapshot: dict[str, Any], namespaces: dict[str, str] | None = None) -> None:
        self.snapshot = snapshot  # the response as created: status in_progress, no output
        self.namespaces = namespaces or {}  # function name -> the namespace tool that held it
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self._message: dict[str, Any] | None = None  # the message item being streamed
        self._text = ""

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self.snapshot),
            self._event("response.in_progress", response=self.snapshot),
        ]

    def text(self, delta: str) -> list[dict[str, Any]]:
        events = []
        if self._message is None:
            self._message = message_item("", status="in_progress")
            self._message["content"] = []
            self.output.append(self._message)
            events.append(self._item_event("response.output_item.added", self._message))
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(self._part_event("response.content_part.added", part))
        self._text += delta
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=self._message["id"],
                output_index=self._index(self._message),
                content_index=0,
                delta=delta,
                logprobs=[],
            )
        )
        return events

    def thinking(self, text: str) -> list[dict[str, Any]]:
        """Nothing while streaming: the thinking comes whole, as the reasoning item of the final response."""
        return []

    def call(self, call: ToolCall) -> list[dict[str, Any]]:
        events = self._close_message()
        item = call_item(call, status="in_progress", arguments="", namespace=self.namespaces.get(call.name))
        self.output.append(item)
        index = self._index(item)
        events.append(self._item_event("response.output_item.added", item))
        events.append(
            self._event(
                "response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=call.arguments
            )
        )
        events.append(
            self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=call.arguments,
            )
        )
        item.update(arguments=call.arguments, status="completed")
        events.append(self._item_event("response.output_item.done", item))
        return events

    def finish(self, final: dict[str, Any]) -> list[dict[str, Any]]:
        """The closing events; `final`: the whole response (`response_body`), whose output these events built."""
        events = self._close_message()
        final["output"] = self.output
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return [*events, self._event(kind, response=final)]

    def fail(self, failed: dict[str, Any]) -> list[dict[str, Any]]:
        """The one closing event of a response that failed after its stream started; `failed`: the whole response
        (`response_body` with status `failed` and its `error`). The text so far stays in its message, `incomplete`."""
        message = self._message
        if message is not None:
            part = {"type": "output_text", "text": self._text, "annotations": [], "logprobs": []}
            message.update(content=[part], status="incomplete")
        failed["output"] = self.output
        return [self._event("response.failed", response=failed)]

    def _close_message(self) -> list[dict[str, Any]]:
        message = self._message
        if message is None:
            return []
        self._message = None
        part = {"type": "output_text", "text": self._text, "annotations": [], "logprobs": []}
        index = self._index(message)
        events = [
            self._event(
                "response.output_text.done",
                item_id=message["id"],
                output_index=index,
                content_index=0,
                text=self._text,
                logprobs=[],
            ),
            self._part_event("response.content_part.done", part, message),
        ]
        message.update(content=[part], status="completed")
        events.append(self._item_event("response.output_item.done", message))
        self._text = ""
        return events

    def _index(self, item: dict[str, Any]) -> int:
        return next(i for i, it in enumerate(self.output) if it is item)

    def _item_event(self, kind: str, item: dict[str, Any]) -> dict[str, Any]:
        return self._event(kind, output_index=self._index(item), item=dict(item))

    def _part_event(self, kind: str, part: dict[str, Any], message: dict[str, Any] | None = None) -> dict[str, Any]:
        message = message or self._message
        assert message is not None
        return self._event(kind, item_id=message["id"], output_index=self._index(message), content_index=0, part=part)
