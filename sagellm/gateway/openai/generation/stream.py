"""The server-sent events of a streamed completion or chat: each choice's deltas as chunks, as they come.

A stream is the chunks of its choices' deltas (each choice rendered by its endpoint: a completion's text or a chat's
delta), usage last when asked, then `[DONE]`; a failure after the first token is an `error` event, never text. Events
that are ready together go out in one write, and a delta that carries only text is written from a template of its
chunk (`_text_event`): a token costs one string encode, not a chunk built and encoded whole."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import trio

from sagellm.gateway.http.app import LastEvents
from sagellm.gateway.openai.generation.reply_bodies import Envelope
from sagellm.gateway.replies.choice import Choice
from sagellm.gateway.serving.choice_streams import ChoiceStreams
from sagellm.gateway.serving.errors import api_error
from sagellm.runtime.pipeline.messages import RequestError, TokenDelta

DONE = b"[DONE]"
TEXT_PROBE = "\x00text\x00"  # stands for a delta's text in a chunk's template (no real text is a NUL-framed word)


async def choice_events(
    envelope: Envelope,
    first: tuple[int, TokenDelta],
    streams: ChoiceStreams,
    renders: list[Callable[[TokenDelta], dict[str, Any]]],
    logprobs: bool,
    include_usage: bool,
    opening: dict[str, Any] | None = None,
    ids: bool = False,
    sources: list[dict[str, object]] | None = None,
    parsed: bool = False,
    echo: bool = False,
) -> AsyncIterator[Any]:
    """The SSE events of a streamed request's choices: `renders[i]` turns choice i's delta into its fields (and its
    token ids are added when asked: `ids`); deltas with nothing to show (a token that ends mid-character, unless
    its token ids are asked for) are skipped; a failure is an `error` event (the other choices are cancelled); usage
    last when asked. Events that are ready together (the opening and the first delta, deltas the engine made while
    the client's last write went out, the final delta with usage and [DONE]) come as one tuple: one write.
    `parsed`: a render reads the text (a tool-call parser), so every delta goes through it and one that shows
    nothing is skipped; `echo`: the first shown delta comes after the prompt, so every delta goes through its
    render."""
    choices = [Choice(i) for i in range(len(renders))]
    extra = {"usage": None} if include_usage else {}
    opening_extra = extra | ({"sources": sources} if sources is not None else {})  # a grounded chat's, first
    openings = [{**opening, "index": i} for i in range(len(renders))] if opening is not None else []
    ready = [envelope.body(openings, **opening_extra)] if openings else []  # events sent in one write
    plain = not (logprobs or ids or parsed or echo)
    text_events = [_text_event(envelope, render, extra) for render in renders] if plain else None
    index, item = first
    unfinished = len(renders)
    corked = False
    while True:
        if isinstance(item, RequestError):
            ready.append(api_error(item).body())
            streams.cancel()
            break
        choices[index].add(item)
        if text_events is not None and item.text and not item.finished:
            ready.append(text_events[index](item.text))
        elif item.text or item.finished or (logprobs and item.logprobs) or (ids and item.token_ids):
            fields = renders[index](item)
            # a parser may hold a delta's text back: then it shows nothing, unless it ends the stream or has ids or
            # logprobs to show
            if not parsed or fields["delta"] or item.finished or ids or logprobs:
                ready.append(envelope.body([{**fields, "token_ids": item.token_ids} if ids else fields], **extra))
        unfinished -= item.finished
        if not unfinished:
            break
        if ready and not streams.has_ready():
            if not corked:  # corked for one turn of the event loop: a delta made meanwhile goes in the same write
                await trio.lowlevel.checkpoint()
                corked = True
            if not streams.has_ready():
                yield tuple(ready)
                ready, corked = [], False
        try:
            index, item = await anext(streams)
        except StopAsyncIteration:
            break
    if include_usage and all(c.finish_reason is not None for c in choices):
        ready.append(envelope.body([], **envelope.usage_fields(choices, len(choices))))
    yield LastEvents((*ready, DONE))


def _text_event(
    envelope: Envelope, render: Callable[[TokenDelta], dict[str, Any]], extra: dict[str, Any]
) -> Callable[[str], bytes]:
    """A delta's event when it carries only text (no logprobs, token ids or finish): the encoded chunk of a probe
    delta, split where its text goes, so a token costs one string encode instead of building and encoding the whole
    chunk. The bytes are the same as the chunk's."""
    probe = envelope.body([render(TokenDelta(request_id="", token_ids=[], text=TEXT_PROBE))], **extra)
    head, tail = msgspec.json.encode(probe).split(msgspec.json.encode(TEXT_PROBE))
    return lambda text: head + msgspec.json.encode(text) + tail
