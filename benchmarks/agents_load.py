"""The coding-agent workload's client: sessions that each open with a long prefix of their own (a system prompt, a
tool schema and "repository files", generated from a seed), then come back turn after turn with a tool's output and
their previous reply appended, as a coding agent does. Sessions take turns round-robin, one request at a time, so
between two turns of one session every other session's conversation passes through the server's KV cache.

Every turn is one streamed OpenAI chat completion (temperature 0) over a connection of its own (`raw_http`): its time
to first token, and the prompt tokens the server says it served from a cache (`usage.prompt_tokens_details`, which
sageLLM, llama.cpp and vLLM with `--enable-prompt-tokens-details` report; sageLLM says from which tier too)."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from sagellm.benchmarks.chaos_report import progress
from sagellm.benchmarks.overload_client import HOST, TRANSPORT_ERRORS
from sagellm.benchmarks.raw_http import RawClient, lines
from sagellm.benchmarks.serve import chunk_text
from sagellm.common.errors import InvalidInput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATE_TOKENS = 8  # a chat template's tokens around one message (role markers, newlines), at most
PHASES = ("first", "returning", "after restart")  # what a turn is: a session's first, a later one, one after restart
VERBS = ("load", "parse", "merge", "render", "check", "build", "split", "resolve", "flush", "apply", "encode", "scan")
NOUNS = ("config", "token", "block", "session", "request", "header", "graph", "buffer", "index", "plan", "cache", "row")
TOOLS = ("read_file", "grep", "run_tests", "edit_file", "list_dir", "git_diff")
OUTCOMES = ("PASSED", "PASSED", "PASSED", "FAILED", "SKIPPED")


@dataclass(frozen=True)
class Workload:
    """The shape of the run: `sessions` conversations of `turns` turns each, a `prefix_tokens` opening of their own,
    `tool_tokens` of tool output a turn, replies of up to `max_tokens`; the server restarted after every session's
    turn `restart_after` (0: never)."""

    sessions: int = 8
    turns: int = 5
    prefix_tokens: int = 6000
    tool_tokens: int = 250
    max_tokens: int = 100
    restart_after: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("sessions", "turns", "prefix_tokens", "tool_tokens", "max_tokens"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.restart_after < self.turns:
            raise InvalidInput(f"--restart-after must be 0 (never) or a turn before the last, got {self.restart_after}")

    def phase(self, turn: int) -> str:
        """`turn` (from 1) as the report groups it."""
        if turn == 1:
            return PHASES[0]
        return PHASES[2] if self.restart_after and turn > self.restart_after else PHASES[1]


@dataclass
class Turn:
    """One request, as the client saw it: TTFT is send → the first chunk with text (or the end, for a reply
    without any); `cached_tokens` None where the server reported none."""

    session: int
    turn: int
    phase: str
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    cached_by_tier: dict[str, int] | None = None
    output_tokens: int | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Session:
    """One agent's conversation: the messages so far, the next turn's tool output last."""

    index: int
    messages: list[dict[str, str]] = field(default_factory=list)

    def body(self, model: str, max_tokens: int) -> dict[str, Any]:
        return {"model": model, "messages": self.messages, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip


class Conversations:
    """The sessions' texts, made once per run from the seed and the model's tokenizer, so every arm is sent the same
    prefixes and tool outputs (its replies are its own)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, workload: Workload) -> None:
        self.workload = workload
        self._tokenizer = tokenizer
        self.prefixes = [self._prefix(s) for s in range(workload.sessions)]
        self.tools = [[self._tool_output(s, t) for t in range(1, workload.turns + 1)] for s in range(workload.sessions)]

    def sessions(self) -> list[Session]:
        """Fresh sessions at their first turn."""
        made = []
        for s, prefix in enumerate(self.prefixes):
            made.append(Session(s, [{"role": "system", "content": prefix},
                                    {"role": "user", "content": _task(s) + self.tools[s][0]}]))  # fmt: skip
        return made

    def session_tokens(self) -> int:
        """The most tokens a session takes: its last turn's prompt (every message with its template; each earlier
        reply counted as `max_tokens`) and reply."""
        w = self.workload
        replies = (w.turns - 1) * w.max_tokens + w.max_tokens
        return max(
            self._count(self.prefixes[s] + _task(s) + "".join(self.tools[s])) + replies + 2 * w.turns * TEMPLATE_TOKENS
            for s in range(w.sessions)
        )

    def next_turn(self, session: Session, reply: str, turn: int) -> None:
        """Appends the reply to `turn - 1` and the tool output of `turn` (from 1)."""
        session.messages.append({"role": "assistant", "content": reply})
        session.messages.append({"role": "user", "content": self.tools[session.index][turn - 1]})

    def _prefix(self, s: int) -> str:
        rng = random.Random(f"{self.workload.seed}:prefix:{s}")
        repo = f"{rng.choice(NOUNS)}-{rng.choice(VERBS)}er-{rng.randrange(10**6):06d}"
        head = (f"Agent #{s}, a coding agent working in the repository {repo}. Call one tool at a time, read what "
                "it returns, and keep your answers short. The tools, as JSON schemas:\n")  # fmt: skip
        schema = [{"name": tool, "description": f"{tool.replace('_', ' ')} in {repo}",
                   "parameters": {"type": "object", "properties": {rng.choice(NOUNS): {"type": "string"}}}}
                  for tool in TOOLS]  # fmt: skip
        text = head + json.dumps(schema) + "\n\nThe repository's files:\n"
        return self._fill(text, self.workload.prefix_tokens, lambda: _code_line(rng))

    def _tool_output(self, s: int, turn: int) -> str:
        rng = random.Random(f"{self.workload.seed}:tool:{s}:{turn}")
        tool = TOOLS[(s + turn) % len(TOOLS)]
        return self._fill(f"Output of {tool}:\n", self.workload.tool_tokens, lambda: _result_line(rng))

    def _fill(self, text: str, tokens: int, line: Callable[[], str]) -> str:
        """`text`, then lines until the whole is `tokens` long or a line more (lines are counted alone, which
        overcounts where a line's start merges with the newline before it, so the whole is counted again until it
        is long enough); `text` cut to `tokens` where it alone is longer (a tiny test model spells it byte by byte)."""
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            return self._tokenizer.decode(ids[:tokens])
        parts, count = [text], len(ids)
        while count < tokens:
            short = tokens - count
            while short > 0:
                parts.append(line())
                short -= self._count(parts[-1])
            count = self._count("".join(parts))
        return "".join(parts)

    def _count(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])


def _task(s: int) -> str:
    return f"Task: the tests of module {NOUNS[s % len(NOUNS)]} fail; find why and fix it.\n\n"


def _code_line(rng: random.Random) -> str:
    verb, noun, other = rng.choice(VERBS), rng.choice(NOUNS), rng.choice(NOUNS)
    return rng.choice((
        f"def {verb}_{noun}({other}, limit={rng.randrange(100)}):\n",
        f"    return {verb}_{other}({noun}) + {rng.randrange(1000)}\n",
        f"    {noun} = self.{other}s.get({rng.randrange(64)}, None)\n",
        f"class {noun.title()}{verb.title()}er:\n",
        f"    # {verb} the {noun} before the {other} is read\n",
    ))  # fmt: skip


def _result_line(rng: random.Random) -> str:
    noun, verb = rng.choice(NOUNS), rng.choice(VERBS)
    if rng.random() < 0.5:
        return f"tests/test_{noun}.py::test_{verb}_{rng.choice(NOUNS)} {rng.choice(OUTCOMES)}\n"
    return f"src/{noun}.py:{rng.randrange(1, 900)}:    {verb}_{rng.choice(NOUNS)}({noun})\n"


async def send_turn(port: int, body: dict[str, Any], turn: Turn, timeout_s: float) -> str:
    """Streams one turn into `turn` (a failure is recorded, never raised); returns the reply's text."""
    client = RawClient(HOST, port)
    said: list[str] = []
    sent = time.perf_counter()
    try:
        with trio.fail_after(timeout_s):
            reply, chunks = await client.post("/v1/chat/completions", body)
            if reply.status != 200:
                text = b"".join([chunk async for chunk in chunks]).decode(errors="replace")
                turn.error = f"HTTP {reply.status}: {text[:300]}"
                return ""
            async for line in lines(chunks):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    turn.error = f"error event: {line[:300]}"
                    return ""
                _read_usage(chunk.get("usage"), turn)
                text = chunk_text(chunk)
                ended = any(c.get("finish_reason") for c in chunk.get("choices") or [])
                if turn.ttft_s is None and (text or ended):
                    turn.ttft_s = time.perf_counter() - sent
                said.append(text)
        turn.e2e_s = time.perf_counter() - sent
        if turn.ttft_s is None:
            turn.error = "the stream ended without a token"
    except (*TRANSPORT_ERRORS, trio.TooSlowError) as error:
        turn.error = f"{type(error).__name__}: {error}"[:300]
    finally:
        await client.aclose()
    return "".join(said)


def _read_usage(usage: dict[str, Any] | None, turn: Turn) -> None:
    if not usage:
        return
    turn.prompt_tokens = usage.get("prompt_tokens", turn.prompt_tokens)
    turn.output_tokens = usage.get("completion_tokens", turn.output_tokens)
    details = usage.get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        turn.cached_tokens = int(details["cached_tokens"])
    turn.cached_by_tier = details.get("cached_tokens_by_tier") or turn.cached_by_tier


async def converse(
    port: Callable[[], int],
    model: str,
    conversations: Conversations,
    restart: Callable[[], Awaitable[None]],
    timeout_s: float,
    label: str,
    between_rounds: Callable[[], Awaitable[None]] | None = None,
) -> list[Turn]:
    """Every session's turns round-robin, one request at a time; `restart()` after every session's turn
    `restart_after`, and `between_rounds()` before every round of turns after the first. `port()`: the server's port
    now (a restarted server may have another)."""
    workload = conversations.workload
    sessions = conversations.sessions()
    replies: dict[int, str] = {}
    turns: list[Turn] = []
    for t in range(1, workload.turns + 1):
        if t > 1 and t - 1 == workload.restart_after:
            await restart()
        if t > 1 and between_rounds is not None:
            await between_rounds()
        for session in sessions:
            if t > 1:
                conversations.next_turn(session, replies[session.index], t)
            turn = Turn(session.index, t, workload.phase(t))
            replies[session.index] = await send_turn(port(), session.body(model, workload.max_tokens), turn, timeout_s)
            turns.append(turn)
            ttft = "–" if turn.ttft_s is None else f"{1000 * turn.ttft_s:.0f} ms"
            progress(f"{label}: session {session.index} turn {t}: TTFT {ttft}, prompt {turn.prompt_tokens}, "
                     f"cached {turn.cached_tokens}{' ' + turn.error if turn.error else ''}", "agents")  # fmt: skip
    return turns


async def warm_up(port: int, model: str) -> None:
    """A short chat none of the sessions starts with: the first request after a start pays for what is made on first
    use, which is no cache's doing."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    await send_turn(port, body, Turn(-1, 0, "warm-up"), 300)
