"""An SSE event stays one line for clients that split lines as Python's str.splitlines() does (httpx's
`iter_lines`): a token's text holding NEL, LINE SEPARATOR or PARAGRAPH SEPARATOR is escaped in its JSON."""

from __future__ import annotations

import json

from sagellm.gateway.http.app import NamedEvent, frame


def test_line_separators_in_a_tokens_text_are_escaped_and_decode_the_same() -> None:
    text = "a\u2028b\x85c\u2029d é"
    for event in ({"text": text}, NamedEvent("content_block_delta", {"text": text})):
        lines = frame(event).decode().splitlines()
        data = next(line for line in lines if line.startswith("data: "))
        assert json.loads(data.removeprefix("data: "))["text"] == text
        assert len([line for line in lines if line]) == (2 if isinstance(event, NamedEvent) else 1)
