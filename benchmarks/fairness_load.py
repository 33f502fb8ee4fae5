"""The fairness benchmark's client: a trickle of short streamed chats, whose time to first token is what is measured,
and the one heavy request sent into it (a batch of prompts scored with `echo` + `logprobs`, or one long prompt). One
connection per request (`raw_http`: cheap enough not to load the 2 cores it measures)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import trio

from sagellm.benchmarks.overload_client import HOST, TRANSPORT_ERRORS, prompt
from sagellm.benchmarks.raw_http import RawClient, lines

# Words of one SmolLM2 token each (a leading space included), so a chat of N of them is about N prompt tokens.
WORDS = ("apple", "river", "stone", "cloud", "green", "table", "music", "light", "paper", "water", "house", "chair",
         "bread", "sound", "plant", "field", "night", "story", "glass", "train", "money", "dream", "ocean", "smile",
         "winter", "summer", "garden", "window", "doctor", "letter", "mountain", "forest")  # fmt: skip


@dataclass
class Chat:
    """One chat of the trickle; times in seconds of the trio clock."""

    sent: float
    first_token_s: float | None = None  # sent → the first streamed chunk with text
    end: str | None = None  # its finish reason, an HTTP status, or "transport ..."


@dataclass
class Heavy:
    """The heavy request: when it was sent, how long it took, and how it ended."""

    sent: float
    seconds: float | None = None
    status: int | None = None
    prompt_tokens: int = 0


def chat_body(model: str, rng: random.Random, words: int, max_tokens: int) -> dict[str, Any]:
    content = " ".join(rng.choice(WORDS) for _ in range(words))
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }


def echo_body(model: str, rng: random.Random, prompts: int, tokens: int, max_tokens: int) -> dict[str, Any]:
    """What lm-evaluation-harness sends to score prompts, `prompts` of them at once: each scored token by token."""
    batch = [prompt(rng, tokens) for _ in range(prompts)]
    return {"model": model, "prompt": batch, "echo": True, "logprobs": 1, "max_tokens": max_tokens, "temperature": 0}


def long_body(model: str, rng: random.Random, tokens: int, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "prompt": prompt(rng, tokens), "max_tokens": max_tokens, "temperature": 0}


async def send_chat(port: int, body: dict[str, Any], into: list[Chat]) -> None:
    """Streams one chat to its end; its time to the first chunk that carries text is recorded in `into`."""
    chat = Chat(trio.current_time())
    into.append(chat)
    client = RawClient(HOST, port)
    try:
        reply, chunks = await client.post("/v1/chat/completions", body)
        if reply.status != 200:
            chat.end = str(reply.status)
            return
        async for line in lines(chunks):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line.removeprefix("data: ")).get("choices") or []:
                if chat.first_token_s is None and (choice.get("delta") or {}).get("content"):
                    chat.first_token_s = trio.current_time() - chat.sent
                chat.end = choice.get("finish_reason") or chat.end
    except TRANSPORT_ERRORS as error:
        chat.end = f"transport {type(error).__name__}"
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()


async def trickle(port: int, model: str, rng: random.Random, every_s: float, words: int, max_tokens: int,
                  stop: trio.Event, into: list[Chat]) -> None:  # fmt: skip
    """A chat every `every_s` (±20%, so chats do not fall in step with the engine's steps) until `stop` is set; then
    waits for the chats under way to end."""
    async with trio.open_nursery() as nursery:
        while not stop.is_set():
            nursery.start_soon(send_chat, port, chat_body(model, rng, words, max_tokens), into)
            with trio.move_on_after(every_s * rng.uniform(0.8, 1.2)):
                await stop.wait()


async def send_heavy(port: int, path: str, body: dict[str, Any], timeout_s: float) -> Heavy:
    """Sends the heavy request and reads its whole answer (or gives up after `timeout_s`)."""
    heavy = Heavy(trio.current_time())
    client = RawClient(HOST, port)
    try:
        with trio.move_on_after(timeout_s):
            reply, chunks = await client.post(path, body)
            answer = json.loads(b"".join([chunk async for chunk in chunks]) or b"{}")
            heavy.status = reply.status
            heavy.prompt_tokens = (answer.get("usage") or {}).get("prompt_tokens", 0)
            heavy.seconds = trio.current_time() - heavy.sent
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()
    return heavy
