"""A streamed reply's events as the routes build them: the fast path for text-only deltas writes the same bytes as
the whole chunk would."""

from __future__ import annotations

import json
from typing import Any

from sagellm.gateway.openai.generation.reply_bodies import Envelope
from sagellm.gateway.openai.generation.stream import _text_event


def test_a_text_delta_event_from_its_template_has_the_bytes_of_the_whole_chunk() -> None:
    envelope = Envelope("chatcmpl-1", "m", "chat.completion.chunk", created=7)

    def render(item: Any) -> dict[str, Any]:
        return {"index": 0, "delta": {"content": item.text}, "logprobs": None, "finish_reason": None}

    for extra in ({}, {"usage": None}):
        event = _text_event(envelope, render, extra)
        for text in ("word", ' "quoted"\n', "é中文🙂", "\\", ""):
            whole = envelope.body([{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])
            assert event(text) == json.dumps({**whole, **extra}, ensure_ascii=False, separators=(",", ":")).encode()
