"""Reasoning parsers: a reasoning model's reply split into its thinking and its answer, as vLLM's `--reasoning-parser`
splits it (`reasoning_content` beside `content`).

Qwen3 and DeepSeek-R1 (and their distills) think between `<think>` and `</think>`. Whether a reply starts inside the
thinking depends on the prompt, not the model: DeepSeek-R1's template (and Qwen3's thinking variants) ends the
generation prompt with `<think>`, so the reply holds only the closing tag; Qwen3's own template leaves the opening
tag to the model, and with `enable_thinking: false` writes an empty thinking block into the prompt itself. So a
parser is told where the reply starts (`inside`, read off the rendered generation prompt by `starts_inside`), and
takes an opening tag only at the very start of the reply. A tag split across streamed deltas is held back until it
is whole, so the split does not depend on where the stream was cut; a reply whose thinking never closes is all
thinking (the model was cut off while reasoning).

gpt-oss thinks in Harmony's `analysis` channel instead (`openai_gptoss`, read by the Harmony reader, `harmony.py`),
and its reply carries its tool calls in the same stream: `reader` reads such a reply with one Harmony reader."""

from __future__ import annotations

from typing import Any, ClassVar

from sagellm.common.registry import Registry
from sagellm.gateway.replies.events import AnswerEvent, ReasoningEvent, ToolCallEvent
from sagellm.gateway.replies.harmony import CHANNEL, END, MESSAGE, START, HarmonyReader

ReasoningStreamEvent = ReasoningEvent | AnswerEvent


class ReasoningParser:
    """Splits one reply into thinking and answer, streamed (`step` each delta) or whole (`split`)."""

    name: ClassVar[str]
    OPEN: ClassVar[str] = "<think>"
    CLOSE: ClassVar[str] = "</think>"

    def __init__(self, inside: bool) -> None:
        self._inside = inside
        self._at_start = True  # nothing shown yet: an opening tag may still come (after whitespace)
        self._after_close = False  # the answer's first text: the newlines after the closing tag are not its own
        self._held = ""

    @classmethod
    def closing(cls) -> str:
        """What a thinking budget forces when it is spent: the closing tag between newlines, as the models write it."""
        return f"\n{cls.CLOSE}\n\n"

    @classmethod
    def split(cls, text: str, inside: bool) -> tuple[str | None, str | None]:
        """A whole reply's (thinking, answer); None for a part it does not have."""
        events = cls(inside).step(text, finished=True)
        thinking = "".join(e.text for e in events if isinstance(e, ReasoningEvent))
        answer = "".join(e.text for e in events if isinstance(e, AnswerEvent))
        return thinking or None, answer or None

    def step(self, delta: str, finished: bool) -> list[ReasoningStreamEvent]:
        text, self._held = self._held + delta, ""
        events: list[ReasoningStreamEvent] = []
        while text:
            if self._inside:
                end = text.find(self.CLOSE)
                if end < 0:
                    keep = 0 if finished else _partial_suffix(text, self.CLOSE)
                    events += _reasoning(text[: len(text) - keep])
                    self._held = text[len(text) - keep :]
                    break
                events += _reasoning(text[:end])
                text = text[end + len(self.CLOSE) :]
                self._inside, self._at_start, self._after_close = False, False, True
                continue
            if self._at_start:
                stripped = text.lstrip()
                if stripped.startswith(self.OPEN):
                    text, self._inside = stripped[len(self.OPEN) :], True
                    continue
                if not finished and (not stripped or self.OPEN.startswith(stripped)):
                    self._held = text  # whitespace, or the start of an opening tag: wait for more
                    break
                self._at_start = False
            if self._after_close:
                text = text.lstrip("\n")
                if not text:
                    break
                self._after_close = False
            events.append(AnswerEvent(text))
            break
        return events


def _reasoning(text: str) -> list[ReasoningStreamEvent]:
    return [ReasoningEvent(text)] if text else []


def _partial_suffix(text: str, tag: str) -> int:
    """How many of `text`'s last characters could be the start of `tag` (held back until the next delta says)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


REASONING_PARSERS: Registry[type[ReasoningParser]] = Registry("reasoning parser")


@REASONING_PARSERS.register
class Qwen3Parser(ReasoningParser):
    """Qwen3 (and QwQ): `<think>` ... `</think>`, the opening tag the model's when the template does not write it."""

    name = "qwen3"


@REASONING_PARSERS.register
class DeepSeekR1Parser(ReasoningParser):
    """DeepSeek-R1 and its distills: the template opens `<think>` in the prompt; the reply closes it."""

    name = "deepseek_r1"


@REASONING_PARSERS.register
class GptOssParser(ReasoningParser):
    """gpt-oss (vLLM's `openai_gptoss`): Harmony's `analysis` channel is the thinking, the rest the answer (calls
    left as text: the `openai` tool parser reads them). Its tags are the analysis message's header and end, which a
    thinking budget watches for; the budget closes the thinking by ending the message and opening the final one."""

    name = "openai_gptoss"
    OPEN = f"{CHANNEL}analysis{MESSAGE}"
    CLOSE = END

    def __init__(self, inside: bool) -> None:
        super().__init__(inside)
        self._reader = HarmonyReader(read_calls=False)

    @classmethod
    def closing(cls) -> str:
        return f"{END}{START}assistant{CHANNEL}final{MESSAGE}"

    def step(self, delta: str, finished: bool) -> list[ReasoningStreamEvent]:
        events = self._reader.step(delta, finished)
        return [e if isinstance(e, ReasoningEvent) else AnswerEvent(e.text) for e in events
                if not isinstance(e, ToolCallEvent)]  # fmt: skip


def parser_class(name: str) -> type[ReasoningParser]:
    """A reasoning parser by its `--reasoning-parser` name; an unknown name is a RegistryError listing the known."""
    return REASONING_PARSERS.get(name)


def default_parser(chat_template: str | None) -> str | None:
    """The parser a model's template implies: one that writes Harmony's channels is gpt-oss's; one that writes
    `<think>` tags thinks in them; None for the rest."""
    if chat_template and CHANNEL in chat_template:
        return GptOssParser.name
    return "qwen3" if chat_template and "</think>" in chat_template else None


def starts_inside(tokenizer: Any, chat_template: str | None, template_kwargs: dict[str, Any] | None) -> bool:
    """Whether a reply starts inside the thinking: the rendered generation prompt ends with an open `<think>`."""
    probe = [{"role": "user", "content": "."}]
    rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True,
                                             chat_template=chat_template, **(template_kwargs or {}))  # fmt: skip
    tail = rendered.rstrip()
    return tail.endswith(ReasoningParser.OPEN)
